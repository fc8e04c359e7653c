"""In-place ShiftAddViT conversion of a (trained) GNT: `reparameterize(model, cfg)`, torchao-style.

Independent parts, each picked by `ShiftAddConfig` and each starting from the trained weights:
  * ray attention core: dense softmax(q k^T) -> binary-hashed additive attention (codes fitted on real q/k),
  * attention linears: every nn.Linear inside RayAttention / ViewAttention -> ShiftLinear,
  * FFNs: FeedForward -> shift linears inside, or a Mult/Shift mixture of experts (dense copy + shift copy),
  * front end: the second layer of GNT's per-view feature MLP (rgbfeat_fc2) -> ShiftLinear,
  * blend head: the per-view feature block of its view_fc1 -> a shift layer inside a BlockShiftLinear;
  * position fusion: each fusion MLP's second layer -> ShiftLinear, its first layer's query block and the point
    code's sines and cosines -> two shift layers inside a BlockShiftLinear;
and, with int_activations, every shift layer -> an integer shift layer (IntShiftLinear).
Modules already converted are left alone, so a model can be converted in stages (attention first, FFNs later).
A per-module filter (name globs in `cfg.exclude` and/or a callable) keeps chosen modules dense.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gnt_shiftadd.config import ShiftAddConfig
from gnt_shiftadd.models.heads import BlendColorHead
from gnt_shiftadd.models.transformers import DotProductAttention, FeedForward, RayAttention, ViewAttention
from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
from gnt_shiftadd.shiftadd.hashed_attention import ATTENTION_CORES
from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear
from gnt_shiftadd.shiftadd.moe import MoEFeedForward
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec

ModuleFilter = Callable[[str, nn.Module], bool]  # (qualified name, module) -> True to convert


class ReparameterizeError(ValueError):
    """A conversion cannot be carried out as configured (e.g. hashing asked for without calibration data)."""


@dataclass
class ConversionReport:
    """What `reparameterize` changed, by qualified module name."""

    attention_cores: list[str] = field(default_factory=list)
    shift_linears: list[str] = field(default_factory=list)
    shift_ffns: list[str] = field(default_factory=list)
    moe_ffns: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # excluded by the filter
    int_shift_linears: list[str] = field(default_factory=list)  # shift layers given integer activations
    front_end_linears: list[str] = field(default_factory=list)  # the front end's second layer -> shift
    head_linears: list[str] = field(default_factory=list)  # the blend head's view_fc1 feature block -> shift
    fusion_linears: list[str] = field(default_factory=list)  # position fusion: fc1's two blocks, fc2 -> shift

    def summary(self) -> str:
        return (f"{len(self.attention_cores)} attention cores hashed, {len(self.shift_linears)} attention linears "
                f"-> shift, {len(self.front_end_linears)} front-end layers -> shift, {len(self.head_linears)} head "
                f"feature blocks -> shift, {len(self.fusion_linears)} position-fusion layers -> shift, "
                f"{len(self.shift_ffns)} FFNs -> "
                f"shift, {len(self.moe_ffns)} FFNs -> MoE, "
                f"{len(self.int_shift_linears)} shift layers -> integer activations, "
                f"{len(self.skipped)} modules kept dense by the filter")


def shift_spec(cfg: ShiftAddConfig) -> ShiftSpec:
    return ShiftSpec(exponent_min=cfg.shift_exponent_min, exponent_max=cfg.shift_exponent_max,
                     channel_scale=cfg.shift_channel_scale, fixed_point_bits=cfg.shift_fixed_point_bits)


def shift_feedforward(ff: FeedForward, spec: ShiftSpec) -> FeedForward:
    """A copy of a FeedForward whose two linears are shift layers (rounded from the trained weights)."""
    shifted = copy.deepcopy(ff)
    shifted.fc1 = ShiftLinear.from_linear(ff.fc1, spec)
    shifted.fc2 = ShiftLinear.from_linear(ff.fc2, spec)
    return shifted


def _make_filter(cfg: ShiftAddConfig, filter_fn: ModuleFilter | None) -> ModuleFilter:
    def keep_converting(name: str, module: nn.Module) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.exclude):
            return False
        return filter_fn(name, module) if filter_fn is not None else True

    return keep_converting


def _set_child(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _convert_attention_linears(model, spec, wanted, report) -> None:
    for name, module in list(model.named_modules()):
        if not isinstance(module, (RayAttention, ViewAttention)):
            continue
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear:
                if wanted(full, child):
                    setattr(module, child_name, ShiftLinear.from_linear(child, spec))
                    report.shift_linears.append(full)
                else:
                    report.skipped.append(full)


def _convert_front_end(model, spec, wanted, report) -> None:
    """The second layer of every GNT front end (rgbfeat_fc2: hidden -> C per (sample, view), on ReLU outputs) ->
    ShiftLinear. The first layer stays dense: its feature block is folded into the source feature maps by the
    kernels (once per set of views, not per gathered row), and its inputs mix colours and CNN features, whose
    ranges one activation scale would not serve."""
    for name, module in list(model.named_modules()):
        layer = getattr(module, "rgbfeat_fc2", None)
        if type(layer) is not nn.Linear:
            continue
        full = f"{name}.rgbfeat_fc2" if name else "rgbfeat_fc2"
        if wanted(full, layer):
            module.rgbfeat_fc2 = ShiftLinear.from_linear(layer, spec)
            report.front_end_linears.append(full)
        else:
            report.skipped.append(full)


def _convert_head(model, spec, wanted, report) -> None:
    """The per-view feature block of every blend colour head's view_fc1 (features_v -> hidden on every (sample,
    view): the bulk of the head's multiply-accumulates) -> a shift layer, in a BlockShiftLinear; the h and ray_diff
    blocks, other ranges, stay dense. ReparameterizeError for a model without a blend head (model.color_head:
    regress has no per-view layer)."""
    heads = [(name, module) for name, module in model.named_modules() if type(module) is BlendColorHead]
    if not heads:
        raise ReparameterizeError("shiftadd.head: shift needs a blend colour head (model.color_head: blend); this "
                                  "model has none")
    for name, module in heads:
        if type(module.view_fc1) is not nn.Linear:  # already converted
            continue
        full = f"{name}.view_fc1" if name else "view_fc1"
        if wanted(full, module.view_fc1):
            channels = module.norm.normalized_shape[0]
            module.view_fc1 = BlockShiftLinear.from_linear(module.view_fc1, channels, spec)
            report.head_linears.append(full)
        else:
            report.skipped.append(full)


def _convert_position_fusion(model, spec, wanted, report) -> None:
    """Every position fusion MLP (Linear([q | point code | direction code] -> C), ReLU, Linear(C -> C), once per
    sample): its second layer -> ShiftLinear and two blocks of its first layer -> shift layers inside a
    BlockShiftLinear, each reading one kind of value: the query (C -> C, the residual stream) and the point code's
    sines and cosines (6F -> C, values in [-1, 1]). The point's raw coordinates (another range) and the direction
    code (once per ray) stay dense. ReparameterizeError for a model without one."""
    owners = [(name, module) for name, module in model.named_modules()
              if isinstance(getattr(module, "pos_fuse", None), nn.ModuleList) and len(module.pos_fuse)]
    if not owners:
        raise ReparameterizeError("shiftadd.position_fusion: shift needs a GNT transformer with position fusion "
                                  "layers (model.trans_depth >= 1); this model has none")
    for name, module in owners:
        channels, waves = module.rgbfeat_fc2.out_features, module.pos_enc.out_dim - module.pos_enc.input_dims
        for index, mlp in enumerate(module.pos_fuse):
            prefix = f"{name}.pos_fuse.{index}" if name else f"pos_fuse.{index}"
            for position in (0, 2):
                layer, full = mlp[position], f"{prefix}.{position}"
                if type(layer) is not nn.Linear:  # already converted
                    continue
                if not wanted(full, layer):
                    report.skipped.append(full)
                    continue
                mlp[position] = BlockShiftLinear.from_linear(
                    layer, channels, spec, second=(channels + module.pos_enc.input_dims, waves)) if position == 0 \
                    else ShiftLinear.from_linear(layer, spec)
                report.fusion_linears.append(full)


def _convert_ffns(model, cfg: ShiftAddConfig, spec, wanted, report, expert_latency) -> None:
    for name, module in list(model.named_modules()):
        if type(module) is not FeedForward:
            continue
        if not wanted(name, module):
            report.skipped.append(name)
            continue
        if cfg.ffn == "shift":
            _set_child(model, name, shift_feedforward(module, spec))
            report.shift_ffns.append(name)
        elif cfg.ffn == "moe":
            device = next(module.parameters()).device
            dispatch = cfg.moe_dispatch if cfg.moe_dispatch != "auto" else ("sorted" if device.type == "cuda" else "gather")
            moe = MoEFeedForward([module, shift_feedforward(module, spec)], dim=module.fc1.in_features,
                                 noisy=cfg.moe_noisy, balance_coef=cfg.moe_balance_coef,
                                 expert_latency=expert_latency, latency_weighting=cfg.moe_latency_weighting,
                                 dispatch=dispatch)
            _set_child(model, name, moe.to(device))
            report.moe_ffns.append(name)


def _convert_attention_cores(model, cfg: ShiftAddConfig, wanted, report, run_calibration) -> None:
    """Replace dense cores one at a time, in forward order; each is fitted on the q/k/v it sees *after* the
    earlier layers were converted, so later layers calibrate on the inputs they will really get."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, RayAttention)]
    for name, attention in targets:
        if not isinstance(attention.core, DotProductAttention):
            continue  # already converted
        if not wanted(f"{name}.core", attention.core):
            report.skipped.append(f"{name}.core")
            continue
        head_dim = attention.q_fc.out_features // attention.num_heads
        core = ATTENTION_CORES[cfg.ray_attention](attention.num_heads, head_dim, cfg.hash_bits)
        core = core.to(next(attention.parameters()).device)
        if run_calibration is not None:
            captured = {}

            def capture(_module, inputs, _output):
                captured["qkv"] = tuple(t.detach() for t in inputs)

            handle = attention.core.register_forward_hook(capture)
            try:
                with torch.no_grad():
                    run_calibration()
            finally:
                handle.remove()
            if "qkv" not in captured:
                raise ReparameterizeError(f"calibration never ran {name}; cannot fit its hash codes")
            core.calibrate(*captured["qkv"])
        attention.core = core
        report.attention_cores.append(f"{name}.core")


def _integerize_shift_linears(model, cfg: ShiftAddConfig, wanted, report) -> None:
    """Every float-activation ShiftLinear -> IntShiftLinear with the same weights (cfg.int_activations bits)."""
    for name, module in list(model.named_modules()):
        if type(module) is ShiftLinear and wanted(name, module):
            _set_child(model, name, IntShiftLinear.from_shift_linear(module, cfg.int_activations, cfg.act_scale))
            report.int_shift_linears.append(name)


@torch.no_grad()
def calibrate_int_shift_linears(model: nn.Module, run_calibration: Callable[[], object]) -> list[str]:
    """Set the per-tensor activation absmax of every uncalibrated per_tensor IntShiftLinear from one calibration
    pass (the maximum |x| each layer sees on those rays); returns the calibrated module names."""
    todo = {name: m for name, m in model.named_modules()
            if isinstance(m, IntShiftLinear) and m.act_scale == "per_tensor" and not m.calibrated}
    if not todo:
        return []
    # per-token scales while observing, so uncalibrated layers can run; observation records raw inputs
    for module in todo.values():
        module.act_scale, module.observing = "per_token", True
    try:
        run_calibration()
    finally:
        for module in todo.values():
            module.act_scale, module.observing = "per_tensor", False
    never = [name for name, m in todo.items() if not m.calibrated]
    if never:
        raise ReparameterizeError(f"calibration never ran (or saw only zeros in) {', '.join(never)}; cannot set "
                                  "their per-tensor activation scale")
    return list(todo)


def reparameterize(model: nn.Module, cfg: ShiftAddConfig, run_calibration: Callable[[], object] | None = None,
                   filter_fn: ModuleFilter | None = None, expert_latency: list[float] | None = None) -> ConversionReport:
    """Convert `model` in place to the variant `cfg` describes; returns what was converted.

    run_calibration: runs the model forward on a batch of real rays (no grad needed); required to fit hash codes
    from data. Without it the structure is built unfitted (what loading a converted checkpoint needs: the state
    dict then brings the fitted codes). expert_latency: [mult, shift] per-token latency for the MoE balance loss
    (default: cfg.moe_expert_latency, else 1:1 until measured).
    """
    wanted = _make_filter(cfg, filter_fn)
    report = ConversionReport()
    spec = shift_spec(cfg)
    was_training = model.training
    model.eval()
    try:
        if cfg.attention_linears == "shift":
            _convert_attention_linears(model, spec, wanted, report)
        if cfg.front_end == "shift":
            _convert_front_end(model, spec, wanted, report)
        if cfg.head == "shift":
            _convert_head(model, spec, wanted, report)
        if cfg.position_fusion == "shift":
            _convert_position_fusion(model, spec, wanted, report)
        if cfg.ray_attention != "dense":
            _convert_attention_cores(model, cfg, wanted, report, run_calibration)
        if cfg.ffn != "dense":
            latency = expert_latency or [float(x) for x in cfg.moe_expert_latency] or None
            _convert_ffns(model, cfg, spec, wanted, report, latency)
        if cfg.int_activations:
            _integerize_shift_linears(model, cfg, wanted, report)
            if cfg.act_scale == "per_tensor" and run_calibration is not None:
                calibrate_int_shift_linears(model, run_calibration)
    finally:
        model.train(was_training)
    return report


def variant_of(model: nn.Module) -> dict[str, str]:
    """Which variant a model currently is, read from its modules (not from a config): for checks and reports."""
    cores = {type(m.core).__name__ for m in model.modules() if isinstance(m, RayAttention)}
    kinds = {name: cls.__name__ for name, cls in ATTENTION_CORES.items()}
    ray_attention = "dense"
    for name, cls_name in kinds.items():
        if cls_name in cores:
            ray_attention = name
    attention_linears = "shift" if any(isinstance(c, ShiftLinear) for m in model.modules()
                                       if isinstance(m, (RayAttention, ViewAttention)) for c in m.children()) else "dense"
    ffn = "dense"
    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        ffn = "moe"
    elif any(isinstance(m, FeedForward) and isinstance(m.fc1, ShiftLinear) for m in model.modules()):
        ffn = "shift"
    front_end = "shift" if any(isinstance(getattr(m, "rgbfeat_fc2", None), ShiftLinear) for m in model.modules()) \
        else "dense"
    head = "shift" if any(type(m) is BlendColorHead and isinstance(m.view_fc1, BlockShiftLinear)
                          for m in model.modules()) else "dense"
    fusion = "shift" if any(isinstance(mlp[0], BlockShiftLinear) for m in model.modules()
                            if isinstance(getattr(m, "pos_fuse", None), nn.ModuleList) for mlp in m.pos_fuse) \
        else "dense"
    return {"ray_attention": ray_attention, "attention_linears": attention_linears, "ffn": ffn, "front_end": front_end,
            "head": head, "position_fusion": fusion}


def check_convertible(source: ShiftAddConfig, target: ShiftAddConfig, where: str) -> None:
    """Conversion only adds reparameterizations: a part already converted cannot become dense or another kind."""
    problems = []
    for part in ("ray_attention", "attention_linears", "ffn", "front_end", "head", "position_fusion"):
        have, want = getattr(source, part), getattr(target, part)
        if have != "dense" and have != want:
            problems.append(f"shiftadd.{part}: {where} has {have!r}, cannot convert it to {want!r}")
    if source.int_activations and (source.int_activations, source.act_scale) != (target.int_activations,
                                                                                 target.act_scale):
        problems.append(f"shiftadd.int_activations/act_scale: {where} has {source.int_activations}/"
                        f"{source.act_scale}, config has {target.int_activations}/{target.act_scale}")
    for key in ("hash_bits", "shift_exponent_min", "shift_exponent_max", "shift_channel_scale"):
        if getattr(source, key) != getattr(target, key) and not _is_dense_for(source, key):
            problems.append(f"shiftadd.{key}: {where} has {getattr(source, key)!r}, config has {getattr(target, key)!r}")
    if problems:
        raise ReparameterizeError("cannot start from that checkpoint:\n  " + "\n  ".join(problems))


def _is_dense_for(source: ShiftAddConfig, key: str) -> bool:
    """True when `key` does not matter yet for `source` (nothing it governs has been converted)."""
    if key == "hash_bits":
        return source.ray_attention == "dense"
    return source.attention_linears == "dense" and source.ffn == "dense" and source.front_end == "dense" and \
        source.head == "dense" and source.position_fusion == "dense"


def warn_if_unfitted(model: nn.Module) -> None:
    unfitted = [name for name, m in model.named_modules()
                if hasattr(m, "hasher") and not bool(getattr(m.hasher, "fitted", torch.tensor(True)))]
    if unfitted:
        warnings.warn(f"hash codes of {', '.join(unfitted)} were never fitted to data", stacklevel=2)
