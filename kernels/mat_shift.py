"""MatShift: y = act(x W^T + b) where W comes as the packed 5-bit sign/exponent codes of a `ShiftLinear`.

Why the kernel decodes instead of shifting every product: the codes decode (bit operations, once per call,
[out, in] values) to weights that are exactly +-2^k in fp32, so a fused multiply-add by them is bit-identical
to shifting the activation's exponent, and it runs on the vector FMA units CPUs and GPUs are built around. The
multiplication-free arithmetic is what the 45 nm energy model prices (`gnt_shiftadd/evaluation/opcount.py`); on
these machines the speed comes from the fusion (bias and activation in the same pass) and from 4x smaller
weights. Activations fp32 or fp16 (accumulation in fp32).

Layout: tokens arrive in tiles, x [tiles, TILE, in] with the tile count symbolic, so one build serves any
number of tokens (the last partial tile follows the facade's tail rule, kernels.dispatch.run_tiled).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec, decode_shift_codes
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, run_tiled

__all__ = ["TILE", "ACTIVATIONS", "reference_mat_shift", "make_mat_shift", "mat_shift", "decode_codes_te"]

TILE = 8  # tokens per tile: the unit of parallel work on CPU and of a thread block row on CUDA
ACTIVATIONS = ("none", "relu")


def reference_mat_shift(x: torch.Tensor, packed: dict, activation: str = "none") -> torch.Tensor:
    """Ground truth: x [..., in] -> [..., out] with the weight decoded by `decode_shift_codes`."""
    weight = decode_shift_codes(packed).to(device=x.device, dtype=torch.float32)
    bias = packed["bias"].to(device=x.device, dtype=torch.float32) if packed["bias"] is not None else None
    y = F.linear(x.float(), weight, bias)
    return (F.relu(y) if activation == "relu" else y).to(x.dtype)


def decode_codes_te(codes, channel_exponent, spec: ShiftSpec, name: str = "weight"):
    """TE stage: uint8 codes [out, in] + int32 channel exponents [out] -> fp32 weight [in, out] (transposed for
    contiguous vector loads over the outputs). Zero code -> 0; else +-2^(field + exponent_min + c[out])."""
    from tvm import te, tirx  # lazy: TVM is optional (the references run without it)

    out_features, in_features = codes.shape
    sign_bit = spec.code_bits - 1

    def decode(i, o):
        code = codes[o, i].astype("int32")
        field = tirx.bitwise_and(code, tirx.const(spec.zero_field, "int32"))
        negative = tirx.bitwise_and(tirx.shift_right(code, tirx.const(sign_bit, "int32")), tirx.const(1, "int32"))
        magnitude = tirx.ldexp(tirx.const(1.0, "float32"), field + spec.exponent_min + channel_exponent[o])
        signed = tirx.if_then_else(negative == 1, -magnitude, magnitude)
        return tirx.if_then_else(field == spec.zero_field, tirx.const(0.0, "float32"), signed)

    return te.compute((in_features, out_features), decode, name=name)


def make_mat_shift(target: dict, in_features: int, out_features: int, spec: ShiftSpec, activation: str,
                   dtype: str = "float32"):
    """IRModule "main"(x [tiles, TILE, in] dtype, codes uint8 [out, in], channel_exponent int32 [out],
    bias fp32 [out], y [tiles, TILE, out] dtype)."""
    import tvm  # lazy: TVM is optional (the references run without it)
    from tvm import s_tir, te, tirx  # lazy: TVM is optional (the references run without it)

    tiles = te.var("tiles")
    x = te.placeholder((tiles, TILE, in_features), dtype, name="x")
    codes = te.placeholder((out_features, in_features), "uint8", name="codes")
    channel_exponent = te.placeholder((out_features,), "int32", name="channel_exponent")
    bias = te.placeholder((out_features,), "float32", name="bias")
    weight = decode_codes_te(codes, channel_exponent, spec)
    k = te.reduce_axis((0, in_features), "k")
    acc = te.compute((tiles, TILE, out_features),
                     lambda t, i, o: te.sum(x[t, i, k].astype("float32") * weight[k, o], axis=k), name="acc")

    def epilogue(t, i, o):
        value = acc[t, i, o] + bias[o]
        if activation == "relu":
            value = te.max(value, tirx.const(0.0, "float32"))
        return value.astype(dtype)

    y = te.compute((tiles, TILE, out_features), epilogue, name="y")
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([x, codes, channel_exponent, bias, y])}))
    if target["kind"] == "cuda":
        _schedule_cuda(sch, out_features)
    else:
        _schedule_cpu(sch, out_features)
    return sch.mod


def _vector_split(sch, loop, extent: int, lanes: int = 16):
    """Split off a vectorizable inner loop when the extent allows it; returns (outer, inner or None)."""
    for width in (lanes, 8, 4):
        if extent % width == 0 and extent >= width:
            outer, inner = sch.split(loop, [None, width])
            return outer, inner
    return loop, None


def _schedule_cpu(sch, out_features: int) -> None:
    """Parallel over tiles; per tile the accumulator lives in cache, outputs vectorized, tokens unrolled."""
    y_block, acc_block = sch.get_sblock("y"), sch.get_sblock("acc")
    tile, token, out = sch.get_loops(y_block)
    sch.parallel(tile)
    sch.compute_at(acc_block, tile)
    inner_loops = sch.get_loops(acc_block)[1:]
    if len(inner_loops) != 3:  # unit extents (e.g. 1 input or 1 output feature) were folded away: keep it simple
        return
    a_token, a_out, a_k = inner_loops
    out_outer, out_inner = _vector_split(sch, a_out, out_features)
    if out_inner is not None:
        sch.reorder(out_outer, a_k, a_token, out_inner)
        sch.vectorize(out_inner)
    else:
        sch.reorder(a_out, a_k, a_token)
    sch.unroll(a_token)
    sch.decompose_reduction(acc_block, a_k)
    _, y_out = sch.get_loops(y_block)[-2:]
    _, y_inner = _vector_split(sch, y_out, out_features)
    if y_inner is not None:
        sch.vectorize(y_inner)


def _schedule_cuda(sch, out_features: int) -> None:
    """One block per tile, threads over its (token, output) elements, each accumulating in a register; the decoded
    weight is its own small launch (one thread per weight)."""
    y_block, acc_block = sch.get_sblock("y"), sch.get_sblock("acc")
    weight_block = sch.get_sblock("weight")
    w_in, w_out = sch.get_loops(weight_block)
    w_fused = sch.fuse(w_in, w_out)
    w_bx, w_tx = sch.split(w_fused, [None, 128])
    sch.bind(w_bx, "blockIdx.x")
    sch.bind(w_tx, "threadIdx.x")
    tile, token, out = sch.get_loops(y_block)
    sch.bind(tile, "blockIdx.x")
    fused = sch.fuse(token, out)
    threads = min(TILE * out_features, 256)
    _, thread = sch.split(fused, [None, threads])
    sch.bind(thread, "threadIdx.x")
    sch.compute_at(acc_block, thread)
    sch.set_scope(acc_block, 0, "local")


def mat_shift(x: torch.Tensor, packed: dict, activation: str = "none") -> torch.Tensor:
    """x [..., in] (fp32/fp16, CPU or CUDA) -> act(x W^T + b) [..., out] on the TVM kernel (reference if it
    cannot be built). `packed` = ShiftLinear.export_codes() with its tensors on x's device."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    codes = packed["codes"]
    out_features, in_features = codes.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"mat_shift: x has {x.shape[-1]} input features, the codes expect {in_features}")
    if x.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"mat_shift: x must be float32 or float16, got {x.dtype}")
    spec = ShiftSpec(exponent_min=int(packed["exponent_min"]), exponent_max=int(packed["exponent_max"]))
    dtype = "float32" if x.dtype == torch.float32 else "float16"
    key = {"in": in_features, "out": out_features, "exponents": [spec.exponent_min, spec.exponent_max],
           "activation": activation, "dtype": dtype}
    kernel = get_kernel("mat_shift", key, x.device,
                        lambda t: make_mat_shift(t, in_features, out_features, spec, activation, dtype))
    if kernel is None:
        return reference_mat_shift(x, packed, activation)
    lead = x.shape[:-1]
    rows = kernel_ready(x.reshape(-1, in_features))
    bias = packed["bias"] if packed["bias"] is not None else torch.zeros(out_features, device=x.device)
    weights = (kernel_ready(codes), kernel_ready(packed["channel_exponent"]), kernel_ready(bias, torch.float32))
    out = torch.empty(rows.shape[0], out_features, device=x.device, dtype=x.dtype)

    def launch(inputs, outputs):
        kernel(inputs[0].view(-1, TILE, in_features), *weights, outputs[0].view(-1, TILE, out_features))

    run_tiled(launch, TILE, rows.shape[0], [rows], [out])
    return out.reshape(*lead, out_features)
