"""Compiled Apache TVM kernels for ShiftAdd-GNT inference, each with its PyTorch reference.

dispatch.py         the facade every kernel goes through: get_kernel (loaders such as AOT libraries, then the
                    disk cache / a build), the one tail rule, autograd check, fallback, and what ran where
build.py            compile once, cache on disk, load (targets, cache keys)
backend.py          deprecated shim (old names, now in dispatch.py)
mat_shift.py        MatShift: y = act(x W^T + b) with W given by packed sign/exponent shift codes
ffn.py              LN + FFN (+ in-kernel MoE routing) + residual in one kernel
source_views.py     projection of the samples into the source views, bilinear gathers, mask, view codes, and with
                    them GNT's front end (per-view MLP + max-pool) in one kernel (CPU)
view_features.py    grid_sample outputs -> per-view feature MLP + masked max-pool (GNT's front end)
view_attention.py   the view transformer's attention per (ray, sample) token, fused over views; on the CPU also the
                    whole pre-norm half-block (LN, q_fc, the attention, out_fc, residual)
int_view_attention.py  the view attention with 8-bit integer shift layers (g, j) in one VNNI kernel, and with it
                    the whole pre-norm half-block (LN, integer q_fc, the attention, integer out_fc, residual) (CPU)
int_ray_attention.py   a ray block's attention half with integer q/k/v/out layers and the hashed core (LN, one
                    quantization for q|k|v, codes, popcount softmax by table, out_fc, residual) per ray (CPU, VNNI)
position_fusion.py  the points' NeRF encoding (sin/cos polynomials) and GNT's position-fusion MLP per ray (CPU)
int_position_fusion.py  the same with the query, sine/cosine and second layers 8-bit integer shift layers (n):
                    the waves in registers, three VNNI products per tile of samples (CPU)
ray_attention.py    a ray block's attention half (LN, q/k/v, dense or hashed core, out_fc, residual) per ray (CPU)
view_blend.py       the blend colour head's per-view MLP, masked softmax over views and colour blend, fused
blend_head.py       the whole blend colour head per ray (norm, the per-view blend, softmax over the samples) (CPU)
hashed_attention.py hash + pack, XOR/popcount softmax attention, additive linear attention
ops.py              every kernel as a torch custom op (torch.ops.shiftadd_gnt.*)
apply.py            use_kernels_(model, KernelConfig, filter_fn): swap a trained model's leaves to the kernels
aot.py              ahead-of-time export (one .so per kernel + manifest.json) and a loader that needs only the
                    TVM runtime; $SHIFTADD_GNT_AOT_KERNELS=<folder> installs one when this package is imported
selfcheck.py        every kernel against its reference on one device (the CUDA tests; python -m kernels.selfcheck)
"""
import os as _os

if _os.environ.get("SHIFTADD_GNT_AOT_KERNELS"):  # prebuilt kernels named by the environment (GPU check, deployment)
    from kernels.aot import install_from_environment as _install_from_environment

    _install_from_environment()
