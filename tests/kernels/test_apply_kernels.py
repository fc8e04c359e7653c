"""use_kernels_(): a converted GNT with its leaves swapped to the TVM kernels renders the same colours as on the
PyTorch reference, and records which module ran on which kernel."""
import copy

import pytest
import torch

pytest.importorskip("tvm")

from gnt_shiftadd.config import ShiftAddConfig  # noqa: E402
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene  # noqa: E402
from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear  # noqa: E402
from gnt_shiftadd.shiftadd.moe import MoEFeedForward  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import reparameterize  # noqa: E402
from gnt_shiftadd.training.warm_start import calibration_forward  # noqa: E402
from gnt_shiftadd.models.transformers import RayTransformerBlock, ViewTransformerBlock  # noqa: E402
from kernels.apply import KernelConfig, KernelFFNSublayer, KernelHashedAttention, KernelRayAttentionSublayer, \
    KernelFrontEnd, KernelShiftLinear, KernelViewAttention, KernelViewAttentionSublayer, kernel_summary, use_kernels, \
    use_kernels_  # noqa: E402
from kernels.dispatch import KernelFallbackError, all_kernels_required, kernel_map, require_all_kernels  # noqa: E402

VARIANTS = {
    "dense": ShiftAddConfig(),
    "hash_quadratic+shift": ShiftAddConfig(ray_attention="hash_quadratic", attention_linears="shift"),
    "hash_linear+shift_ffn": ShiftAddConfig(ray_attention="hash_linear", ffn="shift"),
    "hash_quadratic+moe": ShiftAddConfig(ray_attention="hash_quadratic", ffn="moe", moe_noisy=False,
                                         moe_expert_latency=[1.0, 0.5]),
}


@pytest.mark.parametrize("gemm", ["tvm", "blas", "auto"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernels_match_the_reference_model(tiny_config, variant, gemm):
    cfg = tiny_config("model.dropout=0.0")
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    model = build_model(cfg, torch.device("cpu")).eval()
    run = calibration_forward(model, tensors, cfg)
    shiftadd = VARIANTS[variant]
    if shiftadd != ShiftAddConfig():
        reparameterize(model, shiftadd, run_calibration=run)
    for moe in (m for m in model.modules() if isinstance(m, MoEFeedForward)):
        torch.nn.init.normal_(moe.router.weight, 0.0, 2.0)  # route tokens both ways
    model.eval()
    with torch.no_grad():
        expected = run()
        summary = use_kernels(model, "tvm", gemm=gemm)
        got = run()
    depth = cfg.model.trans_depth
    assert summary["KernelViewAttentionSublayer"] == depth and summary["KernelFFNSublayer"] == 2 * depth
    assert summary["skipped"] == []
    assert summary["KernelFrontEnd"] == 1  # projection, gathers and the per-view MLP in one kernel
    assert summary["KernelPositionFusion"] == 1  # the points' encoding and every fusion MLP
    transformer = model.transformer
    # the forwards are the model's own; only leaves changed
    assert all(type(b) is ViewTransformerBlock for b in transformer.view_blocks)
    assert all(type(b) is RayTransformerBlock for b in transformer.ray_blocks)
    assert isinstance(transformer.front_end, KernelFrontEnd)
    assert all(isinstance(b.attn_sublayer, KernelViewAttentionSublayer) and isinstance(b.ffn, KernelFFNSublayer)
               for b in transformer.view_blocks)
    # the fused ray-attention sublayer covers dense and hashed-quadratic cores; the linear form keeps its core kernel
    fused = shiftadd.ray_attention in ("dense", "hash_quadratic")
    assert all(isinstance(b.attn_sublayer, KernelRayAttentionSublayer) == fused for b in transformer.ray_blocks)
    assert all(isinstance(b.attn.core, KernelHashedAttention) == (not fused) for b in transformer.ray_blocks)
    if shiftadd.attention_linears == "shift":  # on the CPU every shift linear is inside a fused sublayer kernel
        assert not any(isinstance(m, KernelShiftLinear) for m in model.modules())
    assert "KernelViewAttentionSublayer" in kernel_summary(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    ran = require_all_kernels(model)  # nothing fell back; every leaf says what it ran
    assert ran["transformer.view_blocks.0.attn_sublayer"] == {"view_attention_sublayer": "tvm"}
    assert ran["transformer.front_end"] == {"source_front_end": "tvm"}
    assert ran["transformer.position_fusion"] == {"position_fusion": "tvm"}
    expected_ffn = "blas" if gemm == "blas" and shiftadd.ffn != "moe" else "tvm"  # auto: the fused FFN kernel
    assert ran["transformer.ray_blocks.1.ffn"] == {"ffn_sublayer": expected_ffn}
    if fused:
        assert ran["transformer.ray_blocks.0.attn_sublayer"] == {"ray_attention": "tvm"}
    else:
        assert ran["transformer.ray_blocks.0.attn.core"] == {"hash_pack": "tvm", "hashed_linear": "tvm"}


def test_torch_backend_leaves_the_model_alone_and_training_mode_is_refused(tiny_config):
    cfg = tiny_config()
    model = build_model(cfg, torch.device("cpu"))
    assert use_kernels(model, "torch")["backend"] == "torch"
    assert kernel_summary(model) == "no kernels"
    with pytest.raises(RuntimeError, match="eval"):
        use_kernels(model.train(), "tvm")
    with pytest.raises(ValueError, match="backend"):
        use_kernels(model.eval(), "cuda")
    with pytest.raises(ValueError, match="gemm"):
        use_kernels(model.eval(), "tvm", gemm="mkl")
    assert kernel_summary(model) == "no kernels"  # a refused choice swaps nothing


@pytest.mark.parametrize("backend", ["tvm", "auto"])
def test_missing_tvm_degrades_to_torch_with_one_warning(tiny_config, monkeypatch, backend):
    monkeypatch.setattr("kernels.dispatch.tvm_available", lambda: False)
    monkeypatch.setattr("kernels.dispatch._WARNED", set())
    model = build_model(tiny_config(), torch.device("cpu")).eval()
    with pytest.warns(RuntimeWarning, match="TVM is not importable"):
        assert use_kernels(model, backend)["backend"] == "torch"
    assert kernel_summary(model) == "no kernels"


def test_filter_fn_keeps_chosen_leaves_on_pytorch_and_a_fallback_fails_the_check(tiny_config):
    cfg = tiny_config("model.dropout=0.0")
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    model = build_model(cfg, torch.device("cpu")).eval()
    run = calibration_forward(model, tensors, cfg)
    with torch.no_grad():
        expected = run()
        summary = use_kernels_(model, KernelConfig("tvm", gemm="blas"), filter_fn=lambda module, fqn: ".ffn" not in fqn)
        assert "KernelFFNSublayer" not in summary and summary["KernelViewAttentionSublayer"] == cfg.model.trans_depth
        with all_kernels_required(model) as ran:
            torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-4)
        assert ran["transformer.view_blocks.1.attn_sublayer"] == {"view_attention_sublayer": "tvm"}
        assert use_kernels_(model, KernelConfig("tvm"))["KernelFFNSublayer"] == 2 * cfg.model.trans_depth  # staged
        assert use_kernels_(model, KernelConfig("tvm")).keys() == {"backend", "skipped"}  # nothing wrapped twice
    # a call that needs gradients runs the differentiable reference: the check names the module
    x = torch.randn(2, 3, cfg.model.netwidth, requires_grad=True)
    block = model.transformer.ray_blocks[0]
    block.ffn(x, block.ff_norm, block.ff).sum().backward()
    with pytest.raises(KernelFallbackError, match="ray_blocks.0.ffn: ffn_sublayer"):
        require_all_kernels(model)
    assert kernel_map(model)["transformer.ray_blocks.0.ffn"] == {"ffn_sublayer": "reference"}


def test_replacing_a_layer_after_the_swap_is_refused(tiny_config):
    model = build_model(tiny_config("model.dropout=0.0"), torch.device("cpu")).eval()
    use_kernels(model, "tvm")
    block = model.transformer.view_blocks[0]
    block.ff = copy.deepcopy(block.ff)
    with pytest.raises(RuntimeError, match="use_kernels_ again"):
        block(torch.zeros(1, 2, 16), torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 1))


def test_for_cuda_the_view_blocks_keep_the_attention_kernel(tiny_config):
    """The fused view-attention sublayer is CPU-only: a model prepared for CUDA (the AOT export records it on CPU
    tensors) swaps the attention alone, as before."""
    model = build_model(tiny_config(), torch.device("cpu")).eval()
    summary = use_kernels_(model, KernelConfig("tvm", device_type="cuda"))
    assert summary["KernelViewAttention"] == 2 and "KernelViewAttentionSublayer" not in summary
    assert all(isinstance(b.attn, KernelViewAttention) for b in model.transformer.view_blocks)


@pytest.mark.parametrize("act_scale,front_end,head,fusion", [
    ("per_token", "dense", "dense", "dense"), ("per_tensor", "dense", "dense", "dense"),
    ("per_tensor", "shift", "dense", "dense"), ("per_tensor", "shift", "shift", "dense"),
    ("per_tensor", "shift", "shift", "shift")])
def test_integer_variants_run_every_block_on_its_integer_kernel(tiny_config, act_scale, front_end, head, fusion):
    """j (per-token scales), k (calibrated per-tensor scales), l (k + the front end's second layer), m (l + the
    blend head's feature block) and n (m + the position fusion's layers), converted as the variant configs do:
    every view and ray attention sublayer and every FFN on its fused integer kernel (l's front end on the fused
    front end with its integer layer, m's head on the blend-head kernel with its integer block, n's position fusion
    on the integer position-fusion kernel), nothing falls back, and the colours match the integer modules (a value
    the kernels' own fp32 order puts at a rounding tie may quantize one step apart)."""
    from kernels.int_shift import vnni_available

    if not vnni_available():
        pytest.skip("the integer kernels need AVX-512 VNNI")
    from kernels.apply import KernelIntRayAttentionSublayer, KernelIntViewAttentionSublayer

    cfg = tiny_config("model.dropout=0.0", "model.feature_channels=16",  # 16 hidden units fold into 16 channels
                      *(("model.color_head=blend",) if head == "shift" else ()))
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    model = build_model(cfg, torch.device("cpu")).eval()
    run = calibration_forward(model, tensors, cfg)
    reparameterize(model, ShiftAddConfig(ray_attention="hash_quadratic", attention_linears="shift", ffn="shift",
                                         front_end=front_end, head=head, position_fusion=fusion,
                                         shift_exponent_min=-6, int_activations=8,
                                         act_scale=act_scale), run_calibration=run)
    model.eval()
    with torch.no_grad():
        expected = run()
        summary = use_kernels(model, "tvm")
        got = run()
    depth = cfg.model.trans_depth
    assert summary["KernelIntViewAttentionSublayer"] == depth and summary["KernelIntRayAttentionSublayer"] == depth
    assert summary["skipped"] == []
    transformer = model.transformer
    assert all(isinstance(b.attn_sublayer, KernelIntViewAttentionSublayer) for b in transformer.view_blocks)
    assert all(isinstance(b.attn_sublayer, KernelIntRayAttentionSublayer) for b in transformer.ray_blocks)
    for block in transformer.ray_blocks:
        assert block.attn_sublayer.weights.per_token == (act_scale == "per_token")
    ran = require_all_kernels(model)
    assert ran["transformer.view_blocks.0.attn_sublayer"] == {"int_view_sublayer": "tvm"}
    assert ran["transformer.ray_blocks.0.attn_sublayer"] == {"int_ray_attention": "tvm"}
    assert ran["transformer.ray_blocks.1.ffn"] == {"int_ffn_sublayer": "tvm"}
    assert ran["transformer.front_end"] == {"source_front_end": "tvm"}
    integer_front_end = transformer.front_end.weights.second is not None
    assert integer_front_end == (front_end == "shift")
    assert isinstance(transformer.rgbfeat_fc2, IntShiftLinear) == integer_front_end  # inside the fused leaf
    if head == "shift":
        assert ran["transformer.head.ray_blend"] == {"blend_head": "tvm"}
        assert transformer.head.ray_blend.weights.features_int is not None
    assert ran["transformer.position_fusion"] == ({"int_position_fusion": "tvm"} if fusion == "shift" else
                                                  {"position_fusion": "tvm"})
    assert (got - expected).abs().mean() < 1e-3 and (got - expected).abs().max() < 0.05
