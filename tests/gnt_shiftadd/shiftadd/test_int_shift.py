"""Integer shift layers: conversion, calibration, straight-through gradients, quantization-aware fine-tuning on the
procedural scene, op counts, and the kernel-backed model against the reference model."""
import copy

import pytest
import torch
from torch import nn

from gnt_shiftadd.config import ConfigError, ShiftAddConfig
from gnt_shiftadd.evaluation.opcount import OpCounts, _count_int_shift_linear
from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear, export_int_shift, exponent_span_histogram, \
    int_shift_reference, integer_weights
from gnt_shiftadd.shiftadd.reparameterize import ReparameterizeError, check_convertible, reparameterize
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec
from gnt_shiftadd.training.warm_start import calibration_forward

INT8 = dict(attention_linears="shift", ffn="shift", shift_exponent_min=-6, int_activations=8)


def _rgb(output):
    return output["rgb"] if isinstance(output, dict) else output


def _int8_reference_frame(dense, **variant):
    """The dense model converted to the int8 variant (INT8, updated by `variant`) on the reference modules, its
    calibration forward, and the colours that forward gives (what the kernel-swapped model must reproduce)."""
    cfg, model, tensors = dense
    reparameterize(model, ShiftAddConfig(**{**INT8, **variant}))
    run = calibration_forward(model, tensors, cfg)
    with torch.no_grad():
        expected = _rgb(run())
    return model, run, expected


def test_conversion_calibrates_per_tensor_scales_and_weights_are_exact_int8(dense):
    cfg, model, tensors = dense
    run = calibration_forward(model, tensors, cfg)
    report = reparameterize(model, ShiftAddConfig(**INT8, act_scale="per_tensor"), run_calibration=run)
    layers = [m for m in model.modules() if isinstance(m, ShiftLinear)]
    assert layers and all(isinstance(m, IntShiftLinear) for m in layers)
    assert len(report.int_shift_linears) == len(layers)
    for layer in layers:
        assert layer.calibrated and layer.act_scale == "per_tensor"
        packed = export_int_shift(layer)
        assert packed["weight_int"].dtype == torch.int8
        w_int, out_scale = integer_weights(layer)
        assert torch.equal(w_int * out_scale[:, None], layer.effective_weight())  # exact decomposition
        assert exponent_span_histogram(layer)["span_le_6"] == layer.out_features
    with torch.no_grad():
        assert torch.isfinite(_rgb(run())).all()


def test_per_tensor_layer_without_calibration_is_a_clear_error(dense):
    cfg, model, tensors = dense
    reparameterize(model, ShiftAddConfig(**INT8, act_scale="per_tensor"))  # no calibration rays
    with pytest.raises(RuntimeError, match="no calibrated activation_absmax"):
        with torch.no_grad():
            calibration_forward(model, tensors, cfg)()


def test_int_config_is_validated(tiny_config):
    with pytest.raises(ConfigError, match="int_activations must be 0, 8 or 16"):
        tiny_config("shiftadd.int_activations=4")
    with pytest.raises(ConfigError, match="exponent_max - shift_exponent_min <= 6"):
        tiny_config("shiftadd.int_activations=8", "shiftadd.ffn=shift")  # default [-14, 0] span is 14
    with pytest.raises(ConfigError, match="act_scale"):
        tiny_config("shiftadd.act_scale=per_row")
    with pytest.raises(ReparameterizeError, match="int_activations"):
        check_convertible(ShiftAddConfig(**INT8), ShiftAddConfig(attention_linears="shift", ffn="shift",
                                                                 shift_exponent_min=-6), "ckpt")


def test_straight_through_gradients():
    """d y / d x passes where the input is inside the clamp range (scaled by s * inv ~ 1) and is 0 where it
    saturated; the shift parameters get the ShiftLinear STE gradients."""
    torch.manual_seed(0)
    layer = IntShiftLinear.from_linear(nn.Linear(16, 8), ShiftSpec(exponent_min=-6), 8, "per_tensor")
    layer.activation_absmax.fill_(1.0)
    x = torch.randn(5, 16).requires_grad_(True)
    with torch.no_grad():
        x[0, :4] = torch.tensor([3.0, -3.0, 5.0, -7.0])  # saturate
    grad_out = torch.randn(5, 8)
    layer(x).backward(grad_out)
    w_int, out_scale = integer_weights(layer)
    level = 127.0
    s, inv = torch.tensor(1.0) / level, level / torch.tensor(1.0)
    inside = (x.detach() * inv).abs() <= level
    expected = ((grad_out * out_scale * s) @ w_int.detach()) * inv * inside
    torch.testing.assert_close(x.grad, expected)
    assert (x.grad[0, :4] == 0).all() and (x.grad[0, 4:] != 0).any()
    for p in (layer.sign_param, layer.exponent_param, layer.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_forward_equals_integer_reference_in_training_mode():
    torch.manual_seed(1)
    layer = IntShiftLinear.from_linear(nn.Linear(32, 24), ShiftSpec(exponent_min=-6), 8).train()
    x = torch.randn(50, 32) * 5
    assert torch.equal(layer(x).detach(), int_shift_reference(x, export_int_shift(layer)))


def test_quantization_aware_finetune_recovers_quality(dense):
    """Convert a GNT to int8 shift layers; a few steps of fine-tuning towards the dense model's colours on the
    procedural scene's rays (straight-through estimators) must remove most of the conversion error."""
    cfg, model, tensors = dense
    teacher_run = calibration_forward(model, tensors, cfg)
    with torch.no_grad():
        target = _rgb(teacher_run()).detach()
    student = copy.deepcopy(model)
    reparameterize(student, ShiftAddConfig(**INT8))
    run = calibration_forward(student, tensors, cfg)
    with torch.no_grad():
        before = torch.mean((_rgb(run()) - target) ** 2).item()
    assert before > 1e-6  # the conversion changed the model
    student.train()
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    for _ in range(40):
        optimizer.zero_grad()
        loss = torch.mean((_rgb(run()) - target) ** 2)
        loss.backward()
        optimizer.step()
    student.eval()
    with torch.no_grad():
        after = torch.mean((_rgb(run()) - target) ** 2).item()
    assert after < 0.5 * before, (before, after)


def test_op_counts_use_8_bit_shifts(dense):
    cfg, model, tensors = dense
    reparameterize(model, ShiftAddConfig(**INT8))
    layer = next(m for m in model.modules() if isinstance(m, IntShiftLinear))
    ops = OpCounts()
    _count_int_shift_linear(ops, "ffn", layer, (torch.zeros(10, layer.in_features),), None)
    total = ops.total()
    assert total[("shift", "int8")] == 10 * layer.nonzero_weights()
    assert total[("add", "int32")] == 10 * (layer.nonzero_weights() - layer.out_features)
    assert OpCounts.energy_pj(total) > 0


@pytest.mark.skipif(not pytest.importorskip("kernels.int_shift").vnni_available(), reason="no AVX-512 VNNI")
def test_kernel_model_renders_the_reference_models_frame_bit_for_bit(dense):
    pytest.importorskip("tvm")
    from kernels.apply import KernelIntShiftLinear, use_kernels
    from kernels.dispatch import require_all_kernels

    model, run, expected = _int8_reference_frame(dense)
    summary = use_kernels(model, "tvm", filter_fn=lambda module, fqn: isinstance(module, IntShiftLinear))
    assert summary.get("KernelIntShiftLinear", 0) == len(
        [m for m in model.modules() if isinstance(m, KernelIntShiftLinear)]) > 0
    with torch.no_grad():
        got = _rgb(run())
    assert torch.equal(got, expected)
    mapping = require_all_kernels(model)
    assert any(kernels.get("int_shift") == "tvm" for kernels in mapping.values())


@pytest.mark.skipif(not pytest.importorskip("kernels.int_shift").vnni_available(), reason="no AVX-512 VNNI")
@pytest.mark.parametrize("ray_core", ["dense", "hash_quadratic"])
def test_full_kernel_swap_of_an_int8_variant_passes_the_tvm_row_check(dense, ray_core):
    """use_kernels on an int8 variant: blocks holding integer layers are not fallbacks (their layers run on the
    integer kernel), so require_all_kernels accepts the model; the frame matches the reference model closely
    (the other kernels are fp32 kernels with their own summation order, and an ulp of difference in an integer
    layer's input can move its rounding by one quantization step; bit-exactness is the test above). With the
    hashed ray core (g, j) each ray attention runs whole on the integer ray-attention kernel, and each view
    attention sublayer on the integer view-sublayer kernel."""
    pytest.importorskip("tvm")
    from kernels.dispatch import require_all_kernels
    from kernels.apply import use_kernels

    model, run, expected = _int8_reference_frame(dense, ray_attention=ray_core)
    summary = use_kernels(model, "tvm")
    assert summary["skipped"] == []
    with torch.no_grad():
        got = _rgb(run())
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=5e-3)  # one 8-bit step moves a pixel by ~4e-3
    mapping = require_all_kernels(model)
    # every integer layer runs on an integer kernel: FFN pairs (and their LayerNorm) on the fused
    # int_ffn_sublayer, each view attention's eight layers (and its LayerNorm) on int_view_sublayer, with the hashed
    # core each ray attention's q, k, v and out_fc (4 layers) on int_ray_attention, a dense-core ray attention's
    # projections on int_shift
    layers = len([m for m in model.modules() if isinstance(m, IntShiftLinear)])
    ran = {name: sum(kernels.get(name) == "tvm" for kernels in mapping.values())
           for name in ("int_ffn_sublayer", "int_view_sublayer", "int_ray_attention", "int_shift")}
    depth = model.cfg.trans_depth
    assert ran["int_ffn_sublayer"] == 2 * depth and ran["int_view_sublayer"] == depth
    assert ran["int_ray_attention"] == (depth if ray_core == "hash_quadratic" else 0)
    assert ran["int_shift"] + 2 * ran["int_ffn_sublayer"] + 8 * ran["int_view_sublayer"] \
        + 4 * ran["int_ray_attention"] == layers


@pytest.mark.skipif(not pytest.importorskip("kernels.int_shift").vnni_available(), reason="no AVX-512 VNNI")
def test_fused_int_ffn_leaves_render_the_reference_models_frame_bit_for_bit(dense):
    """The integer FFN half-blocks on the fused kernel with the LayerNorm taken from PyTorch
    (int_norm_in_kernel=False; fc1 + ReLU + fc2 + residual in the kernel) and the other integer layers on theirs:
    the same frame as the modules, bit for bit."""
    pytest.importorskip("tvm")
    from gnt_shiftadd.models.transformers import PreNormFeedForward
    from kernels.apply import KernelConfig, KernelIntFFNSublayer, use_kernels_
    from kernels.dispatch import require_all_kernels

    model, run, expected = _int8_reference_frame(dense)
    summary = use_kernels_(model, KernelConfig(int_norm_in_kernel=False),
                           filter_fn=lambda module, fqn: isinstance(module, (IntShiftLinear, PreNormFeedForward)))
    assert summary["KernelIntFFNSublayer"] == 2 * model.cfg.trans_depth
    assert all(isinstance(block.ffn, KernelIntFFNSublayer)
               for block in [*model.transformer.view_blocks, *model.transformer.ray_blocks])
    with torch.no_grad():
        got = _rgb(run())
    assert torch.equal(got, expected)
    assert require_all_kernels(model)["transformer.ray_blocks.0.ffn"] == {"int_ffn": "tvm"}


def test_integer_linears_converts_the_direct_linear_children_only():
    from torch import nn

    from gnt_shiftadd.shiftadd.int_shift import integer_linears_

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)), nn.LayerNorm(16)).eval()
    reference = IntShiftLinear.from_linear(block[0], ShiftSpec(exponent_min=-6), 8, "per_token")
    assert integer_linears_(block) is block
    assert isinstance(block[0], IntShiftLinear) and not block[0].training
    assert (block[0].activation_bits, block[0].act_scale) == (8, "per_token")
    assert type(block[2][0]) is nn.Linear and isinstance(block[3], nn.LayerNorm)  # only direct nn.Linear children
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(block[0](x), reference(x))


def test_rounding_tie_distance_is_measured_in_quantization_steps():
    from gnt_shiftadd.shiftadd.int_shift import rounding_tie_distance

    x = torch.tensor([[1.0, 2.5 / 127, 2.25 / 127, -3.5 / 127]])  # absmax 1: one step is 1/127
    torch.testing.assert_close(rounding_tie_distance(x), torch.tensor([[0.5, 0.0, 0.25, 0.0]]), atol=1e-5, rtol=0)
