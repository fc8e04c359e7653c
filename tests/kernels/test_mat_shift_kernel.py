"""MatShift kernel vs its reference (and the ShiftLinear module) on many shapes; CUDA build; cache behaviour."""
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec  # noqa: E402
from kernels import build  # noqa: E402
from kernels.mat_shift import make_mat_shift, mat_shift, reference_mat_shift  # noqa: E402


def _shift_layer(in_features, out_features, bias=True, spec=ShiftSpec(), seed=0):
    torch.manual_seed(seed)
    return ShiftLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), spec)


@pytest.mark.parametrize("in_features,out_features,tokens", [(32, 128, 1000), (35, 32, 1), (7, 3, 13),
                                                             (64, 256, 77), (4, 5, 9), (1, 1, 8)])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_matches_reference_and_module(in_features, out_features, tokens, activation):
    layer = _shift_layer(in_features, out_features)
    packed = layer.export_codes()
    x = torch.randn(tokens, in_features)
    out = mat_shift(x, packed, activation)
    expected = reference_mat_shift(x, packed, activation)
    with torch.no_grad():
        module_out = layer(x)
    module_out = torch.relu(module_out) if activation == "relu" else module_out
    assert out.shape == (tokens, out_features)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected, module_out, rtol=1e-5, atol=1e-5)


def test_leading_dims_no_bias_zero_weights_and_wide_exponents():
    spec = ShiftSpec(exponent_min=-6, exponent_max=2, channel_scale=False)
    layer = _shift_layer(24, 40, bias=False, spec=spec)
    with torch.no_grad():  # force some zero codes
        layer.sign_param[:, ::3] = 0
    packed = layer.export_codes()
    assert packed["bias"] is None
    x = torch.randn(3, 5, 24)
    out = mat_shift(x, packed)
    assert out.shape == (3, 5, 40)
    torch.testing.assert_close(out, reference_mat_shift(x, packed), rtol=1e-5, atol=1e-5)


def test_fp16_activations_accumulate_in_fp32():
    layer = _shift_layer(32, 64)
    packed = layer.export_codes()
    x = torch.randn(50, 32).half()
    out = mat_shift(x, packed, "relu")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference_mat_shift(x.float(), packed, "relu"), rtol=2e-3, atol=2e-3)


def test_empty_input():
    packed = _shift_layer(8, 16).export_codes()
    assert mat_shift(torch.randn(0, 8), packed).shape == (0, 16)


def test_bad_inputs_are_named():
    packed = _shift_layer(8, 16).export_codes()
    with pytest.raises(ValueError, match="8 input features|input features"):
        mat_shift(torch.randn(4, 9), packed)
    with pytest.raises(ValueError, match="float32 or float16"):
        mat_shift(torch.randn(4, 8).double(), packed)
    with pytest.raises(ValueError, match="activation"):
        mat_shift(torch.randn(4, 8), packed, "gelu")


def test_cuda_kernel_builds_without_a_gpu():
    module = make_mat_shift(build.cuda_target("sm_90"), 32, 128, ShiftSpec(), "relu")
    library = tvm.compile(module, target=tvm.target.Target(build.cuda_target("sm_90")))
    assert library is not None


def test_build_is_cached_on_disk_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIFTADD_GNT_KERNEL_CACHE", str(tmp_path))
    packed = _shift_layer(12, 20).export_codes()
    x = torch.randn(10, 12)
    first = mat_shift(x, packed)
    files = list(tmp_path.rglob("mat_shift-*.so"))
    assert len(files) == 1 and build.tvm_version() in str(files[0])
    build._LOADED.clear()  # a new process: must load from disk, not rebuild
    stamp = files[0].stat().st_mtime_ns
    torch.testing.assert_close(mat_shift(x, packed), first)
    assert files[0].stat().st_mtime_ns == stamp


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise build.KernelBuildError("kernel 'mat_shift': build failed: simulated")

    monkeypatch.setattr("kernels.dispatch.build_kernel", broken)  # every kernel is built through the facade
    monkeypatch.setattr("kernels.dispatch._MEMO", {})  # nothing memoised from earlier tests
    packed = _shift_layer(8, 16).export_codes()
    x = torch.randn(5, 8)
    with pytest.warns(RuntimeWarning, match="simulated.*falling back"):
        out = mat_shift(x, packed)
    torch.testing.assert_close(out, reference_mat_shift(x, packed))
