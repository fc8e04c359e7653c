"""use_kernels(): a converted GNT on the TVM kernels renders the same colours as on the PyTorch reference."""
import pytest
import torch

pytest.importorskip("tvm")

from gnt_shiftadd.config import ShiftAddConfig  # noqa: E402
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene  # noqa: E402
from gnt_shiftadd.shiftadd.moe import MoEFeedForward  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import reparameterize  # noqa: E402
from gnt_shiftadd.training.warm_start import calibration_forward  # noqa: E402
from kernels.apply import KernelRayBlock, KernelShiftLinear, KernelViewBlock, kernel_summary, use_kernels  # noqa: E402

VARIANTS = {
    "dense": ShiftAddConfig(),
    "hash_quadratic+shift": ShiftAddConfig(ray_attention="hash_quadratic", attention_linears="shift"),
    "hash_linear+shift_ffn": ShiftAddConfig(ray_attention="hash_linear", ffn="shift"),
    "hash_quadratic+moe": ShiftAddConfig(ray_attention="hash_quadratic", ffn="moe", moe_noisy=False,
                                         moe_expert_latency=[1.0, 0.5]),
}


@pytest.mark.parametrize("gemm", ["tvm", "blas"])
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
    assert summary["view_blocks"] == summary["ray_blocks"] == cfg.model.trans_depth
    assert all(isinstance(b, KernelViewBlock) for b in model.transformer.view_blocks)
    assert all(isinstance(b, KernelRayBlock) for b in model.transformer.ray_blocks)
    if shiftadd.attention_linears == "shift":
        assert any(isinstance(m, KernelShiftLinear) for m in model.modules())
    assert "KernelViewBlock" in kernel_summary(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_torch_backend_leaves_the_model_alone_and_training_mode_is_refused(tiny_config):
    cfg = tiny_config()
    model = build_model(cfg, torch.device("cpu"))
    assert use_kernels(model, "torch")["backend"] == "torch"
    assert kernel_summary(model) == "no kernels"
    with pytest.raises(RuntimeError, match="eval"):
        use_kernels(model.train(), "tvm")
    with pytest.raises(ValueError, match="torch.*tvm|backend"):
        use_kernels(model.eval(), "cuda")
    with pytest.raises(ValueError, match="gemm"):
        use_kernels(model.eval(), "tvm", gemm="mkl")
    assert kernel_summary(model) == "no kernels"  # a refused choice swaps nothing


def test_missing_tvm_degrades_to_torch_with_one_warning(tiny_config, monkeypatch):
    monkeypatch.setattr("kernels.backend.tvm_available", lambda: False)
    monkeypatch.setattr("kernels.backend._WARNED", set())
    model = build_model(tiny_config(), torch.device("cpu")).eval()
    with pytest.warns(RuntimeWarning, match="TVM is not importable"):
        assert use_kernels(model, "tvm")["backend"] == "torch"
