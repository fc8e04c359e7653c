"""The blend head's fused view-blend kernel vs its PyTorch reference, and the reference vs the model's ViewColorBlend."""
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from gnt_shiftadd.models.heads import BlendColorHead, RayColorBlend  # noqa: E402
from kernels.apply import KernelViewColorBlend, use_kernels_  # noqa: E402
from kernels.build import cuda_target  # noqa: E402
from kernels.dispatch import kernel_map  # noqa: E402
from kernels.view_blend import PreparedBlendWeights, make_view_blend, reference_view_blend, view_blend  # noqa: E402


def _weights(channels, hidden, seed=0) -> PreparedBlendWeights:
    torch.manual_seed(seed)
    return PreparedBlendWeights.from_linears(nn.Linear(2 * channels + 4, hidden), nn.Linear(hidden, 1))


def _inputs(tokens, views, channels, hidden, seed=0, visible=0.6):
    """hq [T, H], features [T, V, C], colors [T, V, 3], ray_diff [T, V, 4], random 0/1 mask [T, V]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, hidden, generator=g), torch.randn(tokens, views, channels, generator=g),
            torch.rand(tokens, views, 3, generator=g), torch.randn(tokens, views, 4, generator=g),
            (torch.rand(tokens, views, generator=g) < visible).float())


def _reference(inputs, weights):
    return reference_view_blend(*inputs, *weights.kernel_arguments())


@pytest.mark.parametrize("tokens,views,channels,hidden", [(1, 6, 32, 32), (17, 8, 32, 32), (4096 + 5, 6, 32, 32),
                                                          (50, 3, 24, 30), (33, 10, 16, 7)])
def test_kernel_matches_reference(tokens, views, channels, hidden):
    weights = _weights(channels, hidden, seed=views)
    inputs = _inputs(tokens, views, channels, hidden)
    torch.testing.assert_close(view_blend(*inputs, weights), _reference(inputs, weights), rtol=1e-5, atol=1e-5)


def test_tokens_no_view_sees_are_exactly_zero_and_large_logits_stay_finite():
    torch.manual_seed(1)
    fc1, fc2 = nn.Linear(68, 32), nn.Linear(32, 1)
    with torch.no_grad():
        fc2.weight.mul_(500.0)  # logits in the thousands: the max-subtracted softmax must not overflow
    weights = PreparedBlendWeights.from_linears(fc1, fc2)
    inputs = _inputs(48, 6, 32, 32)
    inputs[4][::4] = 0
    out = view_blend(*inputs, weights)
    assert torch.isfinite(out).all() and torch.all(out[::4] == 0)
    torch.testing.assert_close(out, _reference(inputs, weights), rtol=1e-4, atol=1e-4)


def test_leaf_equals_the_model_head_and_records_the_kernel():
    """KernelViewColorBlend in a BlendColorHead gives the PyTorch head's colours (which use the split fc1); the
    whole-head kernel kept off (on CPU it would cover the view blend: tests/kernels/test_blend_head_kernel.py)."""
    torch.manual_seed(2)
    head = BlendColorHead(dim=32).eval()
    g = torch.Generator().manual_seed(3)
    rays, samples, views = 5, 24, 6
    q = torch.randn(rays, samples, 32, generator=g)
    features = torch.randn(rays, samples, views, 32, generator=g)
    colors = torch.rand(rays, samples, views, 3, generator=g)
    ray_diff = torch.randn(rays, samples, views, 4, generator=g)
    mask = (torch.rand(rays, samples, views, 1, generator=g) < 0.7).float()
    mask[0] = 0  # a ray none of whose samples is seen: black
    with torch.no_grad():
        expected = head(q, features, colors, ray_diff, mask)
        summary = use_kernels_(head, filter_fn=lambda module, name: not isinstance(module, RayColorBlend))
        assert summary.get("KernelViewColorBlend") == 1 and isinstance(head.view_blend, KernelViewColorBlend)
        got = head(q, features, colors, ray_diff, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], torch.zeros(3))
    assert kernel_map(head) == {"view_blend": {"view_blend": "tvm"}}


def test_a_head_whose_layers_are_not_plain_linears_stays_on_the_reference():
    head = BlendColorHead(dim=8).eval()
    head.view_fc1 = nn.Sequential(nn.Linear(20, 32))
    with pytest.warns(RuntimeWarning, match="view_fc1|fc1 must be a plain nn.Linear"):
        summary = use_kernels_(head)
    assert "view_blend" in summary["skipped"]


@pytest.mark.parametrize("bad,message", [("hq", "hq must be"), ("colors", "colors must be"),
                                         ("ray_diff", "ray_diff must be"), ("mask", "mask must be"),
                                         ("features", "features must be")])
def test_shape_errors_name_the_tensor(bad, message):
    weights = _weights(16, 8)
    tensors = dict(zip(("hq", "features", "colors", "ray_diff", "mask"), _inputs(8, 6, 16, 8)))
    tensors[bad] = tensors[bad][..., :-1]
    with pytest.raises(ValueError, match=message):
        view_blend(*tensors.values(), weights)


def test_layer_shape_errors():
    with pytest.raises(ValueError, match="fc2 must be Linear"):
        PreparedBlendWeights.from_linears(nn.Linear(20, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="2C \\+ 4"):
        PreparedBlendWeights.from_linears(nn.Linear(21, 8), nn.Linear(8, 1))


def test_autograd_uses_reference():
    weights = _weights(16, 8)
    inputs = _inputs(10, 6, 16, 8)
    inputs[1].requires_grad_(True)
    view_blend(*inputs, weights).sum().backward()
    assert inputs[1].grad is not None and torch.isfinite(inputs[1].grad).all()


def test_failed_build_falls_back_with_one_warning(failing_kernel_builds):
    failing_kernel_builds("simulated for the view blend test")
    weights = _weights(16, 8)
    inputs = _inputs(9, 3, 16, 8)
    with pytest.warns(RuntimeWarning, match="simulated for the view blend test"):
        out = view_blend(*inputs, weights)
    torch.testing.assert_close(out, _reference(inputs, weights))


@pytest.mark.parametrize("views,channels,hidden", [(6, 32, 32), (10, 32, 32), (8, 24, 30)])
def test_cuda_build_sm90(views, channels, hidden, tmp_path):
    """Builds (and exports) for sm_90 without a GPU: shared-memory stages, one block per tile."""
    target = cuda_target("sm_90")
    library = tvm.compile(make_view_blend(target, views, channels, hidden), target=tvm.target.Target(target))
    source = library.mod.imports[0].inspect_source("cuda")
    assert "__shared__" in source and "__syncthreads" in source and "blockIdx.x" in source
    library.export_library(str(tmp_path / "view_blend_cuda.so"))


def test_cuda_refuses_a_tile_beyond_shared_memory():
    with pytest.raises(ValueError, match="shared memory"):
        make_view_blend(cuda_target("sm_90"), 40, 32, 32)
