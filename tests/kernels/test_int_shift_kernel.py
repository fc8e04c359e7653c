"""Integer shift kernel (AVX-512 VNNI) vs the integer PyTorch reference: bit for bit, on odd sizes, at the
saturation limits, with negative and zero weights, for 8- and 16-bit activations and both scale kinds."""
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear, export_int_shift, int_shift_reference  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec  # noqa: E402
from kernels.int_shift import int_ffn, int_ffn_sublayer, int_shift, make_int_shift, prepare_int_shift, \
    reference_from_weights, reference_int_ffn, reference_int_ffn_sublayer, vnni_available  # noqa: E402

needs_vnni = pytest.mark.skipif(not vnni_available(), reason="this CPU has no AVX-512 VNNI")
SPEC8 = ShiftSpec(exponent_min=-6, exponent_max=0)  # weights exact in int8


def _layer(in_features, out_features, bits=8, act_scale="per_token", spec=SPEC8, seed=0, bias=True):
    torch.manual_seed(seed)
    layer = IntShiftLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), spec, bits, act_scale)
    if act_scale == "per_tensor":
        layer.activation_absmax.fill_(2.5)
    return layer.eval()


@needs_vnni
@pytest.mark.parametrize("in_features,out_features,tokens", [(32, 128, 1), (128, 32, 1003), (32, 32, 37),
                                                             (13, 20, 9), (4, 1, 5)])
@pytest.mark.parametrize("bits,act_scale", [(8, "per_token"), (8, "per_tensor"), (16, "per_token")])
def test_bit_exact_against_reference_and_module(in_features, out_features, tokens, bits, act_scale):
    layer = _layer(in_features, out_features, bits, act_scale)
    packed = export_int_shift(layer)
    x = torch.randn(tokens, in_features) * 3
    out = int_shift(x, prepare_int_shift(packed))
    assert out.shape == (tokens, out_features)
    assert torch.equal(out, int_shift_reference(x, packed))
    with torch.no_grad():
        assert torch.equal(out, layer(x))  # the module (QAT forward) computes the same values


@needs_vnni
@pytest.mark.parametrize("bits", [8, 16])
def test_relu_leading_dims_and_no_bias(bits):
    layer = _layer(32, 48, bits, bias=False)
    weights = prepare_int_shift(export_int_shift(layer))
    x = torch.randn(3, 5, 32)
    out = int_shift(x, weights, "relu")
    assert out.shape == (3, 5, 48)
    assert torch.equal(out, reference_from_weights(x, weights, "relu"))
    assert (out >= 0).all()


@needs_vnni
def test_saturation_at_int8_limits():
    """Calibrated absmax far below the inputs: most activations clamp at +-127, identically in both."""
    layer = _layer(32, 32, 8, "per_tensor")
    layer.activation_absmax.fill_(0.05)
    packed = export_int_shift(layer)
    x = torch.randn(64, 32) * 4
    x[0] = 1e30  # huge values, and a token of exact zeros
    x[1] = 0.0
    out = int_shift(x, prepare_int_shift(packed))
    assert torch.equal(out, int_shift_reference(x, packed))
    # clamped: the first token equals an all-(+127) input
    all_max = torch.full((1, 32), 0.05)
    assert torch.equal(out[0], int_shift_reference(all_max, packed)[0])
    assert torch.equal(out[1], packed["bias"])  # zero input -> bias exactly


@needs_vnni
@pytest.mark.parametrize("bits", [8, 16])
def test_negative_zero_and_extreme_weights(bits):
    """Hand-made integer weights: every power of two of the int8 range, both signs, zeros, whole zero rows."""
    torch.manual_seed(1)
    values = torch.tensor([0, 1, -1, 2, -2, 4, -4, 8, -8, 16, -16, 32, -32, 64, -64], dtype=torch.int8)
    weight = values[torch.randint(0, len(values), (40, 36))]
    weight[:, 3] = 64
    weight[5] = 0
    weight[7] = -64
    packed = {"weight_int": weight if bits == 8 else weight.to(torch.int16),
              "out_scale": torch.ldexp(torch.ones(40), torch.randint(-12, 2, (40,)).float()),
              "bias": torch.randn(40), "bits": bits, "absmax": None}
    x = torch.randn(21, 36)
    x[4] = -x[4].abs()  # a token whose absmax is negative-side
    out = int_shift(x, prepare_int_shift(packed))
    assert torch.equal(out, int_shift_reference(x, packed))
    assert torch.equal(out[:, 5], packed["bias"][5].expand(21))


@needs_vnni
def test_half_way_rounding_is_to_even():
    """Products exactly halfway between integers round to even in the kernel as in torch.round."""
    packed = {"weight_int": torch.eye(16, dtype=torch.int8), "out_scale": torch.ones(16), "bias": None, "bits": 8,
              "absmax": torch.tensor([127.0])}  # scale 1: q = round(x)
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 0.49999997, 7.5, 8.5, 0, 1, -1, 2]])
    out = int_shift(x, prepare_int_shift(packed))
    assert out.tolist() == [[0, 2, 2, -0.0, -2, -2, 4, 126, -126, 0, 8, 8, 0, 1, -1, 2]]


def test_int8_weights_required_for_8_bit_kernel_and_overflow_guard():
    with pytest.raises(ValueError, match="int8 weights"):
        prepare_int_shift({"weight_int": torch.ones(16, 16, dtype=torch.int16), "out_scale": torch.ones(16),
                           "bias": None, "bits": 8, "absmax": None})
    with pytest.raises(ValueError, match="overflow int32"):
        IntShiftLinear(128, 32, spec=ShiftSpec(exponent_min=-14), activation_bits=16)


@pytest.mark.parametrize("in_padded,out_padded", [(32, 128), (128, 32)])
def test_kernel_uses_vnni_with_register_accumulators(in_padded, out_padded):
    """Built for znver4, the 8-bit kernel's inner loop is one vpdpbusd per (token, 16 outputs) of the micro-tile,
    all accumulating into distinct zmm registers that never go to memory: no spill to the stack, and from the
    first dot product on the only 512-bit stores are the fp32 outputs (the accumulator buffer of an earlier
    version was stored after every vpdpbusd)."""
    import re

    from kernels.int_shift import micro_tile

    tile, blocks = micro_tile(out_padded)
    lib = tvm.compile(make_int_shift(in_padded, out_padded, 8, True, "relu", tile, blocks),
                      target=tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    asm = lib.mod.inspect_source("asm")
    dots = re.findall(r"vpdpbusd\s+[^\n]*%(zmm\d+)\n", asm)
    assert len(dots) >= tile * blocks and len(set(dots[:tile * blocks])) == tile * blocks, dots
    assert not re.search(r"vmov\w+\s+%zmm\d+, -?\d*\(%rsp\)", asm), "a zmm register is spilled to the stack"
    after_first_dot = asm[asm.index("vpdpbusd"):]
    stores = re.findall(r"\n\s*(vmov\w+)\s+%zmm\d+, [^\n]*\(", after_first_dot)
    assert stores and set(stores) <= {"vmovaps", "vmovups"}, stores


@needs_vnni
@pytest.mark.parametrize("dim,hidden,tokens", [(32, 128, 1003), (20, 40, 7), (16, 16, 1)])
@pytest.mark.parametrize("bits,act_scale", [(8, "per_token"), (8, "per_tensor"), (16, "per_token")])
def test_fused_int_ffn_is_bit_exact(dim, hidden, tokens, bits, act_scale):
    """x + fc2(relu(fc1(normed))) in one kernel equals the two layers' integer references plus the residual, and
    the modules themselves, bit for bit (odd widths: padded channels stay zero through ReLU and fc2)."""
    fc1, fc2 = _layer(dim, hidden, bits, act_scale, seed=1), _layer(hidden, dim, bits, act_scale, seed=2)
    w1, w2 = prepare_int_shift(export_int_shift(fc1)), prepare_int_shift(export_int_shift(fc2))
    x = torch.randn(tokens, dim) * 2
    normed = torch.nn.functional.layer_norm(x, (dim,))
    out = int_ffn(normed, x, w1, w2)
    assert out.shape == x.shape
    assert torch.equal(out, reference_int_ffn(normed, x, w1, w2))
    with torch.no_grad():
        assert torch.equal(out, x + fc2(torch.relu(fc1(normed))))


def _ffn_pair(dim, hidden, bits, act_scale):
    fc1, fc2 = _layer(dim, hidden, bits, act_scale, seed=1), _layer(hidden, dim, bits, act_scale, seed=2)
    return prepare_int_shift(export_int_shift(fc1)), prepare_int_shift(export_int_shift(fc2))


@needs_vnni
@pytest.mark.parametrize("dim,hidden,tokens", [(32, 128, 1003), (16, 48, 5)])
@pytest.mark.parametrize("bits,act_scale", [(8, "per_token"), (8, "per_tensor"), (16, "per_token")])
def test_int_ffn_sublayer_is_bit_exact_where_the_norm_is_exact(dim, hidden, tokens, bits, act_scale):
    """With the LayerNorm inside the kernel: a zero gain makes the normed tokens exactly the LN bias whatever the
    mean and variance round to (PyTorch's LN is not exact even for +-1 tokens: its running mean divides), so the
    whole sublayer, residual included, must equal PyTorch's LayerNorm + the integer references bit for bit. The
    LN arithmetic itself is checked to a tolerance below."""
    w1, w2 = _ffn_pair(dim, hidden, bits, act_scale)
    torch.manual_seed(3)
    x, ln_b = torch.randn(tokens, dim) * 3, torch.randn(dim)
    out = int_ffn_sublayer(x, torch.zeros(dim), ln_b, 1e-6, w1, w2)
    assert torch.equal(out, reference_int_ffn_sublayer(x, torch.zeros(dim), ln_b, 1e-6, w1, w2))


@needs_vnni
@pytest.mark.parametrize("dim,hidden", [(32, 128), (20, 40)])
def test_int_ffn_sublayer_on_random_tokens(dim, hidden):
    """Random tokens: the in-kernel LN rounds in its own order, so an activation may quantize one step away from
    the reference (a few hundredths at most here); a width that is not a multiple of 16 runs PyTorch's LN and the
    bit-exact int_ffn."""
    w1, w2 = _ffn_pair(dim, hidden, 8, "per_token")
    torch.manual_seed(4)
    x, ln_w, ln_b = torch.randn(777, dim) * 2 + 0.5, torch.rand(dim) + 0.5, torch.randn(dim) * 0.1
    out = int_ffn_sublayer(x, ln_w, ln_b, 1e-6, w1, w2)
    expected = reference_int_ffn_sublayer(x, ln_w, ln_b, 1e-6, w1, w2)
    if dim % 16:
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, rtol=0, atol=0.05)
    with pytest.raises(ValueError, match=r"ln_w and ln_b must be \[%d\]" % dim):
        int_ffn_sublayer(x, ln_w[:3], ln_b, 1e-6, w1, w2)


def test_fused_int_ffn_refuses_layers_that_do_not_chain():
    fc1, fc2 = _layer(32, 64), _layer(48, 32)
    w1, w2 = prepare_int_shift(export_int_shift(fc1)), prepare_int_shift(export_int_shift(fc2))
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="do not form an FFN"):
        int_ffn(x, x, w1, w2)
    w16 = prepare_int_shift(export_int_shift(_layer(64, 32, bits=16)))
    with pytest.raises(ValueError, match="same activation width"):
        int_ffn(x, x, w1, w16)
