"""reparameterize(): in-place conversion of GNT, filters, exactness where the math says so, save/load, staging."""
import copy
from pathlib import Path

import pytest
import torch

from gnt_shiftadd.config import ConfigError, ShiftAddConfig, load_config
from gnt_shiftadd.experiment import build_model
from gnt_shiftadd.models.transformers import DotProductAttention, FeedForward
from gnt_shiftadd.shiftadd.hashed_attention import HashedQuadraticAttention, HashedLinearAttention
from gnt_shiftadd.shiftadd.moe import MoEFeedForward
from gnt_shiftadd.shiftadd.reparameterize import (ReparameterizeError, check_convertible, reparameterize, variant_of)
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear
from gnt_shiftadd.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gnt_shiftadd.training.warm_start import calibration_forward


def _power_of_two_weights(model):
    """Round every linear weight to +-2^k in [-6, 0] so shift conversion is exact (what the math says)."""
    with torch.no_grad():
        for m in model.modules():
            if type(m) is torch.nn.Linear:
                w = m.weight
                m.weight.copy_(torch.sign(w) * torch.exp2(torch.clamp(torch.round(torch.log2(w.abs() + 1e-12)), -6, 0)))


def _outputs(model, run):
    with torch.no_grad():
        return run()


def test_shift_conversion_of_power_of_two_weights_is_exact(dense):
    cfg, model, tensors = dense
    _power_of_two_weights(model)
    run = calibration_forward(model, tensors, cfg)
    before = _outputs(model, run)
    report = reparameterize(model, ShiftAddConfig(attention_linears="shift", ffn="shift", shift_channel_scale=False))
    assert report.shift_linears and len(report.shift_ffns) == 2 * cfg.model.trans_depth
    assert all(isinstance(m.fc1, ShiftLinear) for m in model.modules() if type(m) is FeedForward)
    torch.testing.assert_close(_outputs(model, run), before, rtol=1e-5, atol=1e-6)
    assert variant_of(model) == {"ray_attention": "dense", "attention_linears": "shift", "ffn": "shift", "front_end": "dense",
                                 "head": "dense", "position_fusion": "dense"}


def test_moe_starts_as_its_chosen_expert(dense):
    """Straight-through gate = 1 in forward: routing every token to the mult expert reproduces the dense model."""
    cfg, model, tensors = dense
    run = calibration_forward(model, tensors, cfg)
    before = _outputs(model, run)
    reparameterize(model, ShiftAddConfig(ffn="moe", moe_noisy=False))
    moes = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert len(moes) == 2 * cfg.model.trans_depth
    with torch.no_grad():
        for moe in moes:
            moe.router.bias.copy_(torch.tensor([10.0, -10.0]))
    torch.testing.assert_close(_outputs(model, run), before, rtol=1e-6, atol=1e-6)


def test_hashed_attention_is_fitted_on_real_queries_layer_by_layer(dense):
    cfg, model, tensors = dense
    run = calibration_forward(model, tensors, cfg)
    report = reparameterize(model, ShiftAddConfig(ray_attention="hash_quadratic", hash_bits=8), run_calibration=run)
    cores = [m.attn.core for m in model.transformer.ray_blocks]
    assert report.attention_cores == [f"transformer.ray_blocks.{i}.attn.core" for i in range(cfg.model.trans_depth)]
    assert all(isinstance(c, HashedQuadraticAttention) and bool(c.hasher.fitted) for c in cores)
    assert torch.isfinite(_outputs(model, run)).all()
    # idempotent: a second conversion leaves converted cores alone
    assert reparameterize(model, ShiftAddConfig(ray_attention="hash_quadratic", hash_bits=8)).attention_cores == []


def test_filter_by_name_glob_and_by_callable(dense):
    cfg, model, _ = dense
    cfg_exclude = ShiftAddConfig(attention_linears="shift", exclude=["transformer.view_blocks.*"])
    report = reparameterize(model, cfg_exclude, filter_fn=lambda name, m: not name.endswith("out_fc"))
    assert report.shift_linears and all("ray_blocks" in n and not n.endswith("out_fc") for n in report.shift_linears)
    assert type(model.transformer.view_blocks[0].attn.q_fc) is torch.nn.Linear
    assert type(model.transformer.ray_blocks[0].attn.out_fc) is torch.nn.Linear
    assert isinstance(model.transformer.ray_blocks[0].attn.q_fc, ShiftLinear)
    assert "transformer.view_blocks.0.attn.q_fc" in report.skipped


def test_converted_checkpoint_round_trips_exactly_and_refuses_wrong_variant(dense, tiny_config, tmp_path):
    cfg, model, tensors = dense
    variant = tiny_config("model.dropout=0.0", "shiftadd.ray_attention=hash_linear", "shiftadd.hash_bits=12",
                          "shiftadd.attention_linears=shift", "shiftadd.ffn=moe", "shiftadd.moe_expert_latency=[1.0,0.5]")
    run = calibration_forward(model, tensors, cfg)
    reparameterize(model, variant.shiftadd, run_calibration=run)
    before = _outputs(model, run)
    path = save_checkpoint(tmp_path / "converted.pt", variant, model, step=0)

    rebuilt = build_model(variant, torch.device("cpu")).eval()
    load_checkpoint(path, variant, rebuilt)
    torch.testing.assert_close(_outputs(rebuilt, calibration_forward(rebuilt, tensors, cfg)), before, rtol=0, atol=0)
    assert isinstance(rebuilt.transformer.ray_blocks[0].attn.core, HashedLinearAttention)
    assert bool(rebuilt.transformer.ray_blocks[0].attn.core.hasher.fitted)
    moe = next(m for m in rebuilt.modules() if isinstance(m, MoEFeedForward))
    assert moe.expert_latency.tolist() == [1.0, 0.5]

    wrong = tiny_config("model.dropout=0.0", "shiftadd.ray_attention=hash_linear", "shiftadd.hash_bits=12",
                        "shiftadd.attention_linears=shift", "shiftadd.ffn=shift")
    with pytest.raises(CheckpointError, match="shiftadd.ffn: checkpoint has 'moe', config has 'shift'"):
        load_checkpoint(path, wrong, build_model(wrong, torch.device("cpu")))
    with pytest.raises(CheckpointError, match="shiftadd.ray_attention"):
        load_checkpoint(path, cfg, build_model(cfg, torch.device("cpu")))


def test_conversion_only_adds_reparameterizations():
    check_convertible(ShiftAddConfig(), ShiftAddConfig(ray_attention="hash_linear", ffn="moe"), "ckpt")
    check_convertible(ShiftAddConfig(ray_attention="hash_linear"), ShiftAddConfig(ray_attention="hash_linear", ffn="moe"), "x")
    with pytest.raises(ReparameterizeError, match="shiftadd.ray_attention: ckpt has 'hash_linear', cannot convert it to 'dense'"):
        check_convertible(ShiftAddConfig(ray_attention="hash_linear"), ShiftAddConfig(), "ckpt")
    with pytest.raises(ReparameterizeError, match="hash_bits"):
        check_convertible(ShiftAddConfig(ray_attention="hash_linear", hash_bits=8),
                          ShiftAddConfig(ray_attention="hash_linear", hash_bits=16), "ckpt")


@pytest.mark.parametrize("override, message", [
    ("shiftadd.ray_attention=hashed", "shiftadd.ray_attention must be one of"),
    ("shiftadd.ffn=mixture", "shiftadd.ffn must be dense, shift or moe"),
    ("shiftadd.moe_expert_latency=[1.0]", "moe_expert_latency must be empty"),
    ("shiftadd.shift_exponent_min=3", "shift_exponent_min must be <="),
    ("shiftadd.hash_bitz=3", "unknown key 'hash_bitz'"),
    ("train.distill_weight=0.5", "needs train.distill_from"),
])
def test_bad_shiftadd_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_staged_finetune_from_a_trained_dense_run(tiny_config, tmp_path):
    from gnt_shiftadd import workflows
    from gnt_shiftadd.training.trainer import train

    dense_cfg = tiny_config("train.steps=3", name="dense")
    teacher = train(dense_cfg, progress=False).checkpoint
    variant = tiny_config("train.steps=4", "shiftadd.ray_attention=hash_quadratic", "shiftadd.hash_bits=8",
                          "shiftadd.ffn=moe", "shiftadd.moe_expert_latency=[1.0,0.5]", "shiftadd.moe_balance_coef=0.1",
                          "train.distill_weight=0.5", f"train.distill_from={teacher}", name="moe")
    stages = workflows.finetune_stages(variant, teacher)
    assert [s.shiftadd.ffn for s in stages] == ["dense", "moe"] and [s.train.steps for s in stages] == [2, 2]
    result = workflows.run_finetune(variant, teacher, progress=False)
    assert result.step == 2 and result.checkpoint.exists()
    model, _, _ = workflows.load_trained(variant, backend="torch")  # the PyTorch modules
    assert variant_of(model) == {"ray_attention": "hash_quadratic", "attention_linears": "dense", "ffn": "moe", "front_end": "dense",
                                 "head": "dense", "position_fusion": "dense"}
    stage1_model, _, _ = workflows.load_trained(stages[0], backend="torch")
    assert variant_of(stage1_model)["ffn"] == "dense"
    metrics = workflows.run_eval(variant, progress=False)
    assert metrics["mean"]["psnr"] > 0
    # rerunning resumes (nothing left to do) instead of refusing or redoing
    assert workflows.run_finetune(variant, teacher, progress=False).step == 2

    short = copy.deepcopy(variant)
    short.train.stage1_steps = 4
    with pytest.raises(ConfigError, match="stage1_steps=4"):
        workflows.finetune_stages(short, teacher)


def test_dense_core_is_the_default(dense):
    _, model, _ = dense
    assert all(isinstance(b.attn.core, DotProductAttention) for b in model.transformer.ray_blocks)


@pytest.mark.parametrize("variant", sorted(p.stem for p in Path("configs/shiftadd").glob("*.yaml")))
def test_every_shipped_variant_converts_and_renders(dense, variant):
    """Each configs/shiftadd/*.yaml converts the model into what it names, and the result renders finite colours."""
    from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear

    cfg, model, tensors = dense
    variant_file = f"configs/shiftadd/{variant}.yaml"
    if load_config(variant_file, (), base=copy.deepcopy(cfg)).shiftadd.head != "dense":
        cfg = load_config(None, ("model.color_head=blend",), base=copy.deepcopy(cfg))  # the head variants need it
        model = build_model(cfg, torch.device("cpu")).eval()
    variant_cfg = load_config(variant_file, (), base=copy.deepcopy(cfg))
    model = copy.deepcopy(model)
    run = calibration_forward(model, tensors, variant_cfg)
    reparameterize(model, variant_cfg.shiftadd, run_calibration=run)
    kinds = variant_of(model)
    s = variant_cfg.shiftadd
    assert kinds["attention_linears"] == s.attention_linears and kinds["ffn"] == s.ffn
    assert kinds["front_end"] == s.front_end and kinds["head"] == s.head
    assert kinds["position_fusion"] == s.position_fusion
    integer = sum(isinstance(m, IntShiftLinear) for m in model.modules())
    assert (integer > 0) == bool(s.int_activations)
    out = _outputs(model, run)
    rgb = out["rgb"] if isinstance(out, dict) else out
    assert torch.isfinite(rgb).all()


def test_head_conversion_splits_the_view_layer_and_keeps_its_dense_blocks(tiny_config):
    """shiftadd.head: shift: the blend head's view_fc1 becomes a BlockShiftLinear whose feature block is the
    rounded shift layer and whose h | ray_diff block and bias are the trained ones; the split forward the head
    uses equals the layer on the concatenation; with int_activations the feature block becomes integer; the
    regression head has no such layer (a clear conversion error)."""
    from gnt_shiftadd.models.heads import split_view_linear
    from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
    from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear

    cfg = tiny_config("model.dropout=0.0", "model.color_head=blend")
    model = build_model(cfg, torch.device("cpu")).eval()
    head = model.transformer.head
    dense_fc1 = copy.deepcopy(head.view_fc1)
    report = reparameterize(model, ShiftAddConfig(head="shift", shift_exponent_min=-6))
    assert report.head_linears == ["transformer.head.view_fc1"] and variant_of(model)["head"] == "shift"
    fc1 = head.view_fc1
    assert isinstance(fc1, BlockShiftLinear) and isinstance(fc1.first, ShiftLinear) and fc1.block == 16
    assert torch.equal(fc1.rest.weight, dense_fc1.weight[:, 16:]) and torch.equal(fc1.rest.bias, dense_fc1.bias)
    h, features, ray_diff = torch.randn(2, 3, 16), torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 4)
    whole = fc1(torch.cat([features, h[:, :, None].expand_as(features), ray_diff], dim=-1))
    with torch.no_grad():
        assert torch.allclose(split_view_linear(fc1, h, features, ray_diff), whole, atol=1e-5)
    integer = build_model(cfg, torch.device("cpu")).eval()
    reparameterize(integer, ShiftAddConfig(head="shift", shift_exponent_min=-6, int_activations=8))
    assert isinstance(integer.transformer.head.view_fc1.first, IntShiftLinear)
    regress = build_model(tiny_config("model.dropout=0.0"), torch.device("cpu"))
    with pytest.raises(ReparameterizeError, match="color_head: blend"):
        reparameterize(regress, ShiftAddConfig(head="shift"))
    with pytest.raises(ReparameterizeError, match="shiftadd.head"):
        check_convertible(ShiftAddConfig(head="shift"), ShiftAddConfig(), "the checkpoint")


def test_position_fusion_conversion_splits_the_first_layer_into_shift_and_dense_blocks(tiny_config):
    """shiftadd.position_fusion: shift: each fusion MLP's fc2 becomes a shift layer and its fc1 a BlockShiftLinear
    whose shift blocks are the query and the code's sines and cosines, its dense rest the 3 coordinates and the
    direction code with the trained bias; the leaf's split forward equals the layer on the concatenation; the
    head's BlockShiftLinear is not mistaken for it (variant_of); a model without fusion layers is refused."""
    from torch import nn

    from gnt_shiftadd.models.gnt import PositionFusion
    from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
    from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear

    cfg = tiny_config("model.dropout=0.0")
    model = build_model(cfg, torch.device("cpu")).eval()
    transformer = model.transformer
    dense_fc1 = copy.deepcopy(transformer.pos_fuse[0][0])
    report = reparameterize(model, ShiftAddConfig(position_fusion="shift", shift_exponent_min=-6))
    fusions = len(transformer.pos_fuse)
    assert len(report.fusion_linears) == 2 * fusions
    assert variant_of(model)["position_fusion"] == "shift" and variant_of(model)["head"] == "dense"
    fc1, fc2 = transformer.pos_fuse[0][0], transformer.pos_fuse[0][2]
    channels, code = cfg.model.netwidth, transformer.pos_enc.out_dim
    assert isinstance(fc1, BlockShiftLinear) and isinstance(fc2, ShiftLinear)
    assert fc1.block == channels and fc1.second_start == channels + 3 and fc1.second.in_features == code - 3
    assert torch.equal(fc1.rest.weight[:, :3], dense_fc1.weight[:, channels:channels + 3])
    assert torch.equal(fc1.rest.weight[:, 3:], dense_fc1.weight[:, channels + code:])
    assert torch.equal(fc1.rest.bias, dense_fc1.bias)
    q, points = torch.randn(2, 5, channels), torch.randn(2, 5, 3)
    dir_code = torch.randn(2, transformer.dir_enc.out_dim)
    mlp = transformer.pos_fuse[0]
    with torch.no_grad():
        whole = mlp(torch.cat([q, transformer.pos_enc(points), dir_code[:, None].expand(2, 5, -1)], dim=-1))
        split = PositionFusion()(q, points, dir_code, mlp, transformer.pos_enc, {})
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    integer = build_model(cfg, torch.device("cpu")).eval()
    reparameterize(integer, ShiftAddConfig(position_fusion="shift", shift_exponent_min=-6, int_activations=8))
    fc1 = integer.transformer.pos_fuse[0][0]
    assert isinstance(fc1.first, IntShiftLinear) and isinstance(fc1.second, IntShiftLinear)
    assert isinstance(integer.transformer.pos_fuse[0][2], IntShiftLinear)
    with pytest.raises(ReparameterizeError, match="shiftadd.position_fusion"):
        check_convertible(ShiftAddConfig(position_fusion="shift"), ShiftAddConfig(), "the checkpoint")
    with pytest.raises(ReparameterizeError, match="position fusion layers"):
        reparameterize(nn.Sequential(nn.Linear(4, 4)), ShiftAddConfig(position_fusion="shift"))
