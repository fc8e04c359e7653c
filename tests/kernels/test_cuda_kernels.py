"""The CUDA kernels against their references on a GPU (skipped where there is none: CI builds them only)."""
import pytest
import torch

pytest.importorskip("tvm")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from gnt_shiftadd.models.transformers import FeedForward, ViewAttention  # noqa: E402
from gnt_shiftadd.shiftadd.hashed_attention import pack_bits  # noqa: E402
from gnt_shiftadd.shiftadd.moe import MoEFeedForward  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import shift_feedforward  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec  # noqa: E402
from kernels.ffn import ffn_sublayer, ffn_weights, reference_ffn_sublayer  # noqa: E402
from kernels.hashed_attention import hash_pack, linear_attention, quadratic_attention, reference_hash_pack, \
    reference_linear, reference_quadratic  # noqa: E402
from kernels.mat_shift import mat_shift, reference_mat_shift  # noqa: E402
from kernels.view_attention import PreparedViewWeights, reference_view_attention, view_attention, \
    view_attention_weights  # noqa: E402
from kernels.view_features import ViewFeatureWeights, reference_view_features, view_features  # noqa: E402

CUDA = torch.device("cuda")
TOKENS = [1, 17, 4096 + 3]


def _close(got, expected, tol=1e-4):
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mat_shift(tokens, dtype):
    torch.manual_seed(0)
    packed = ShiftLinear.from_linear(torch.nn.Linear(33, 70), ShiftSpec()).export_codes()
    packed = {k: (v.to(CUDA) if torch.is_tensor(v) else v) for k, v in packed.items()}
    x = torch.randn(tokens, 33, device=CUDA, dtype=dtype)
    _close(mat_shift(x, packed, "relu"), reference_mat_shift(x, packed, "relu"), 1e-2 if dtype == torch.float16 else 1e-4)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("kind", ["dense", "shift", "moe"])
def test_ffn(tokens, kind):
    torch.manual_seed(1)
    dense = FeedForward(32, 128).eval()
    ff = {"dense": dense, "shift": shift_feedforward(dense, ShiftSpec()).eval(),
          "moe": MoEFeedForward([dense, shift_feedforward(dense, ShiftSpec())], dim=32, dispatch="sorted")}[kind]
    if kind == "moe":
        torch.nn.init.normal_(ff.router.weight)
    w = ffn_weights(torch.nn.LayerNorm(32, eps=1e-6).to(CUDA), ff.to(CUDA).eval())
    x = torch.randn(tokens, 32, device=CUDA)
    _close(ffn_sublayer(x, w), reference_ffn_sublayer(x, w))


@pytest.mark.parametrize("tokens", TOKENS)
def test_view_attention_and_front_end(tokens):
    torch.manual_seed(2)
    views, dim = 8, 32
    weights = PreparedViewWeights.from_dict(view_attention_weights(ViewAttention(dim).to(CUDA).eval()))
    qp, features = torch.randn(tokens, dim, device=CUDA), torch.randn(tokens, views, dim, device=CUDA)
    ray_diff = torch.randn(tokens, views, 4, device=CUDA)
    mask = (torch.rand(tokens, views, device=CUDA) > 0.3).float()
    mask[0] = 0
    _close(view_attention(qp, features, ray_diff, mask, weights),
           reference_view_attention(qp, features, ray_diff, mask, weights.source))
    front = ViewFeatureWeights.from_linears(torch.nn.Linear(35, dim).to(CUDA), torch.nn.Linear(dim, dim).to(CUDA))
    rgb, feat = torch.rand(views, 3, tokens, device=CUDA), torch.randn(views, 32, tokens, device=CUDA)
    for got, expected in zip(view_features(rgb, feat, mask, front), reference_view_features(rgb, feat, mask, front)):
        _close(got, expected)


@pytest.mark.parametrize("rays", [1, 37, 2048])
def test_hashed_attention(rays):
    torch.manual_seed(3)
    heads, samples, head_dim, bits = 4, 24, 8, 16
    q, k, v = (torch.randn(rays, heads, samples, head_dim, device=CUDA) for _ in range(3))
    weight, bias = torch.randn(heads, head_dim, bits, device=CUDA), torch.randn(heads, bits, device=CUDA) * 0.1
    words_q, words_k = hash_pack(q, weight, bias), hash_pack(k, weight, bias)
    projection = torch.einsum("rhsd,hdn->rhsn", q, weight) + bias[None, :, None, :]
    near_zero = pack_bits((projection.abs() < 1e-4).long())  # signs that may depend on the summation order
    assert torch.equal((words_q ^ reference_hash_pack(q, weight, bias)) & ~near_zero, torch.zeros_like(words_q))
    scale = torch.full((heads,), 0.3, device=CUDA)
    _close(quadratic_attention(words_q, words_k, v, scale, bits), reference_quadratic(words_q, words_k, v, scale, bits))
    _close(linear_attention(words_q, words_k, v, bits), reference_linear(words_q, words_k, v, bits))
