"""Experiment configuration: typed dataclasses, loaded from a YAML file in `configs/` plus `key=value` overrides.

Configs are data. Every key is checked: an unknown section or key is an error that lists the valid ones, and
values are converted to the field's type (booleans accept only true/false/yes/no/on/off/1/0, so "False" is
false, unlike GNT's argparse flags).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed: the message names the file/key and what is wrong."""


@dataclass
class DataConfig:
    scene: str = "outputs/synthetic_scene"  # folder in LLFF format (poses_bounds.npy + images_<factor>/)
    make_synthetic: bool = False  # generate the procedural scene at `scene` when it does not exist yet
    factor: int = 4  # which images_<factor>/ folder to read
    format: str = "auto"  # auto (detected from the folder) | llff | colmap | transforms | blender (data/formats.py)
    llffhold: int = 8  # every llffhold-th view is held out for evaluation (0: none)
    num_source_views: int = 10
    synthetic_height: int = 72  # size of a generated synthetic scene (only with make_synthetic)
    synthetic_width: int = 96
    synthetic_views: int = 20
    # cross-scene (generalizable) training: when non-empty, every training step draws its target from one of
    # these scenes (all their views; uniform over scenes) and `scene` is only evaluated/validated, never trained
    # on. Entries: a folder, or {scene: folder, factor: N} for a scene that needs its own image factor.
    train_scenes: list = field(default_factory=list)


@dataclass
class ModelConfig:
    netwidth: int = 64
    trans_depth: int = 4  # number of (view transformer, ray transformer) pairs
    num_heads: int = 4  # ray-transformer attention heads
    ff_mult: int = 4  # FFN hidden width = ff_mult * netwidth (64 -> 256 -> 64)
    feature_channels: int = 32  # ResUNet output channels
    resnet_layers: list = field(default_factory=lambda: [3, 4, 6])  # BasicBlocks in layers 1-3 (ResNet-34)
    resnet_base_channels: int = 64
    pos_freqs: int = 10  # NeRF positional-encoding frequencies for points
    dir_freqs: int = 10  # ... and for view directions
    dropout: float = 0.0  # GNT uses 0.1 in attention and FFN
    # how the final tokens become a colour: "regress" (GNT: linear head on the mean over samples) or "blend"
    # (per-sample blend of the source views' colours, then a learned weighting of the samples; see models/heads.py)
    color_head: str = "regress"
    # source-view feature CNN: "resunet" (GNT's, trained from scratch) or "alexnet" (ImageNet-trained AlexNet
    # conv1+conv2, frozen, + a trained 1x1 projection; see models/pretrained_features.py)
    feature_extractor: str = "resunet"


@dataclass
class ShiftAddConfig:
    """Which parts of GNT are reparameterized with ShiftAddViT primitives (all "dense" = plain GNT)."""

    ray_attention: str = "dense"  # dense | hash_quadratic | hash_linear | hash_linear_seed
    attention_linears: str = "dense"  # dense | shift: q/k/v/out (both attentions) + the view attention's pos/attn MLPs
    ffn: str = "dense"  # dense | shift | moe (Mult/Shift mixture of experts)
    # dense | shift: the front end's second layer (rgbfeat_fc2: hidden -> C on every (sample, view), reading ReLU
    # outputs) as a shift layer too; its first layer stays dense (the kernels fold it into the feature maps)
    front_end: str = "dense"
    # dense | shift: the blend colour head's view MLP first layer's per-view feature block (C -> hidden on every
    # (sample, view)) as a shift layer; its per-sample and ray_diff blocks stay dense (models/heads.py)
    head: str = "dense"
    # dense | shift: each position fusion MLP's second layer and two blocks of its first layer, the query (C -> C
    # per sample) and the point code's sines and cosines, as shift layers; the raw coordinates and the direction
    # code stay dense (models/gnt.py, shiftadd/block_linear.py)
    position_fusion: str = "dense"
    hash_bits: int = 16
    shift_exponent_min: int = -14  # 5-bit codes: sign + exponent in [-14, 0], zero allowed (DeepShift-PS)
    shift_exponent_max: int = 0
    shift_channel_scale: bool = True  # per-output-channel power-of-two scale
    shift_fixed_point_bits: int = 0  # 16: 16.16 fixed-point activations into shift layers
    # integer shift layers (gnt_shiftadd/shiftadd/int_shift.py): 8 | 16 = B-bit fixed-point activations x the exact
    # power-of-two integer weights, int32 accumulation (VNNI kernel); 8 needs an exponent span <= 6; 0 = off
    int_activations: int = 0
    act_scale: str = "per_token"  # per_token (dynamic absmax) | per_tensor (absmax calibrated on the scene's rays)
    moe_balance_coef: float = 0.01
    moe_latency_weighting: bool = True
    moe_expert_latency: list = field(default_factory=list)  # [mult, shift] per-token latency; empty: measure here
    moe_noisy: bool = True
    moe_dispatch: str = "auto"  # sorted (no host sync: torch.compile/CUDA graphs) | gather (eager, cheaper) | auto
    exclude: list = field(default_factory=list)  # module-name globs kept dense, e.g. ["transformer.view_blocks.0.*"]


@dataclass
class RenderConfig:
    n_samples: int = 64
    chunk_rays: int = 1024  # rays per forward pass when rendering whole images
    autocast: str = "none"  # none | bf16 | fp16 (GPU only; ignored on CPU)
    # inference backend for eval/render/all/report (training always uses the PyTorch modules): auto (the compiled
    # TVM kernels where they build or load, else the PyTorch reference with one warning) | tvm | torch
    kernels: str = "auto"
    gemm: str = "auto"  # auto (fused FFN kernel; shift linears on TVM on CUDA, BLAS on CPU) | tvm | blas


@dataclass
class TrainConfig:
    steps: int = 2000
    n_rand: int = 512  # random rays per step (one target view per step)
    lr_transformer: float = 5e-4
    lr_cnn: float = 1e-3
    lr_decay_steps: int = 50000  # StepLR step size
    lr_decay_factor: float = 0.5
    seed: int = 0
    log_every: int = 20  # TensorBoard scalars
    val_every: int = 500  # validation image to TensorBoard (0: never)
    ckpt_every: int = 500
    init_from: str = ""  # start a fresh run from this checkpoint's weights (converted to this config's shiftadd variant)
    distill_weight: float = 0.0  # > 0: add weight * MSE to the colours of the teacher checkpoint below
    distill_from: str = ""
    stage1_steps: int = 0  # finetune: steps with only attention converted before the FFNs are (0: half of steps)
    # perceptual loss: each step also renders one patch_size x patch_size patch of the target and adds
    # perceptual_weight x LPIPS-Alex(patch, photo): MSE alone rewards the blurred mean of uncertain geometry
    patch_size: int = 0
    perceptual_weight: float = 0.0
    calibration_rays: int = 256  # rays of real data used to fit hash codes when converting attention
    val_stride: int = 4  # render every val_stride-th pixel for the validation image
    max_minutes: float = 0.0  # > 0: stop after this much wall-clock training (checkpoint at that step; single process)
    # torch.compile (inductor) the transformer for the training step; the first two steps compile (~1-2 min on a
    # 2-core CPU); step time with and without: results/train_speed_compile_cpu.json
    compile: bool = False


@dataclass
class EvalConfig:
    stride: int = 1  # evaluate on every stride-th pixel (1: full resolution)
    views: int = 0  # evaluate this many held-out views, evenly spaced over them (0: all; a 25-view Blender test split costs 25 renders)
    lpips: bool = True
    save_images: bool = True


@dataclass
class VideoConfig:
    frames: int = 30
    fps: int = 15
    stride: int = 1
    n_rots: float = 2.0  # spiral turns
    zrate: float = 0.5


@dataclass
class ReportConfig:
    """run_nerf.py report: which variants, their fine-tuning budget, and how latency is measured."""

    variants: list = field(default_factory=list)  # names from configs/shiftadd/ (empty: all of them)
    finetune_steps: int = 200  # extra steps per variant, from the dense teacher
    latency_repeats: int = 3  # timed renders per variant and backend (median), after one warm-up render
    view: int = -1  # which held-out view is timed and cropped (index into the held-out views; -1: the middle one)
    crop: int = 96  # side of the centre crop in crops.png (pixels of the eval-stride image)
    runs_dir: str = ""  # where the teacher and variant runs live (empty: <report out>/runs)
    remeasure: bool = False  # time every variant again instead of reusing the latencies of an earlier run


@dataclass
class Config:
    name: str = "default"
    out_dir: str = "outputs"  # run folder = out_dir/name
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    shiftadd: ShiftAddConfig = field(default_factory=ShiftAddConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(value: Any, default: Any, where: str) -> Any:
    """Convert `value` to the type of the field's default, strictly."""
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
                return str(value).strip().lower() in _TRUE
            raise ValueError("expected a boolean (true/false)")
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(str(value)) if isinstance(value, str) else int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError("expected a list, e.g. [3, 4, 6]")
            return [type(default[0])(v) for v in value] if default else list(value)
        if isinstance(default, str):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("expected a string")
            return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: cannot use {value!r}: {err}") from None
    raise ConfigError(f"{where}: unsupported field type {type(default).__name__}")


def _apply(target: Any, values: dict, where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{where}.{key}" if where else key)
        else:
            setattr(target, key, _convert(value, current, f"{where}.{key}" if where else key))


def parse_override(text: str) -> dict:
    """'train.steps=100' -> {'train': {'steps': 100}} (value parsed as YAML, so 1e-3 and [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict,)) or value is None:
        value = raw
    nested: dict = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), base: Config | None = None) -> Config:
    """Defaults (or `base`) <- YAML file <- overrides, each checked against the schema."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        _apply(cfg, values, str(path))
    for text in overrides:
        _apply(cfg, parse_override(text), "override")
    validate(cfg)
    return cfg


def config_from_dict(values: dict) -> Config:
    cfg = Config()
    _apply(cfg, values, "config")
    return cfg


def validate(cfg: Config) -> None:
    checks = [
        (cfg.model.netwidth % cfg.model.num_heads == 0, "model.netwidth must be divisible by model.num_heads"),
        (cfg.model.netwidth >= 8, "model.netwidth must be >= 8"),
        (cfg.model.trans_depth >= 1, "model.trans_depth must be >= 1"),
        (cfg.render.n_samples >= 2, "render.n_samples must be >= 2"),
        (cfg.render.autocast in ("none", "bf16", "fp16"), "render.autocast must be none, bf16 or fp16"),
        (cfg.render.kernels in ("auto", "torch", "tvm"), "render.kernels must be auto, torch or tvm"),
        (cfg.render.gemm in ("auto", "tvm", "blas"), "render.gemm must be auto, tvm or blas"),
        (cfg.data.num_source_views >= 1, "data.num_source_views must be >= 1"),
        (cfg.data.factor >= 1, "data.factor must be >= 1"),
        (cfg.data.format in DATA_FORMAT_CHOICES, f"data.format must be one of {', '.join(DATA_FORMAT_CHOICES)}"),
        (cfg.train.n_rand >= 1, "train.n_rand must be >= 1"),
        (cfg.eval.stride >= 1, "eval.stride must be >= 1"),
        (cfg.eval.views >= 0, "eval.views must be >= 0 (0: every held-out view)"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (cfg.model.color_head in COLOR_HEAD_CHOICES, f"model.color_head must be one of {', '.join(COLOR_HEAD_CHOICES)}"),
        (cfg.model.feature_extractor in FEATURE_EXTRACTOR_CHOICES,
         f"model.feature_extractor must be one of {', '.join(FEATURE_EXTRACTOR_CHOICES)}"),
        (cfg.shiftadd.ray_attention in RAY_ATTENTION_CHOICES,
         f"shiftadd.ray_attention must be one of {', '.join(RAY_ATTENTION_CHOICES)}"),
        (cfg.shiftadd.attention_linears in ("dense", "shift"), "shiftadd.attention_linears must be dense or shift"),
        (cfg.shiftadd.ffn in ("dense", "shift", "moe"), "shiftadd.ffn must be dense, shift or moe"),
        (cfg.shiftadd.front_end in ("dense", "shift"), "shiftadd.front_end must be dense or shift"),
        (cfg.shiftadd.head in ("dense", "shift"), "shiftadd.head must be dense or shift"),
        (cfg.shiftadd.position_fusion in ("dense", "shift"), "shiftadd.position_fusion must be dense or shift"),
        (cfg.shiftadd.hash_bits >= 1, "shiftadd.hash_bits must be >= 1"),
        (cfg.shiftadd.shift_exponent_min <= cfg.shiftadd.shift_exponent_max,
         "shiftadd.shift_exponent_min must be <= shiftadd.shift_exponent_max"),
        (cfg.shiftadd.shift_fixed_point_bits in (0, 8, 16), "shiftadd.shift_fixed_point_bits must be 0, 8 or 16"),
        (cfg.shiftadd.int_activations in (0, 8, 16), "shiftadd.int_activations must be 0, 8 or 16"),
        (cfg.shiftadd.act_scale in ("per_token", "per_tensor"), "shiftadd.act_scale must be per_token or per_tensor"),
        (not cfg.shiftadd.int_activations or not cfg.shiftadd.shift_fixed_point_bits,
         "shiftadd.int_activations and shiftadd.shift_fixed_point_bits are two activation formats: set one of them"),
        (cfg.shiftadd.int_activations != 8 or cfg.shiftadd.shift_exponent_max - cfg.shiftadd.shift_exponent_min <= 6,
         "shiftadd.int_activations=8 needs int8 weights: shift_exponent_max - shift_exponent_min <= 6"),
        (cfg.shiftadd.moe_dispatch in ("auto", "sorted", "gather"), "shiftadd.moe_dispatch must be auto, sorted or gather"),
        (cfg.shiftadd.moe_balance_coef >= 0, "shiftadd.moe_balance_coef must be >= 0"),
        (len(cfg.shiftadd.moe_expert_latency) in (0, 2) and all(float(x) > 0 for x in cfg.shiftadd.moe_expert_latency),
         "shiftadd.moe_expert_latency must be empty (measure) or two positive numbers [mult, shift]"),
        (cfg.train.distill_weight >= 0, "train.distill_weight must be >= 0"),
        (cfg.train.perceptual_weight >= 0, "train.perceptual_weight must be >= 0"),
        (not cfg.train.perceptual_weight or cfg.train.patch_size >= 32,
         "train.perceptual_weight > 0 needs train.patch_size >= 32 (LPIPS-Alex needs 32x32 pixels)"),
        (not cfg.train.distill_weight or cfg.train.distill_from, "train.distill_weight > 0 needs train.distill_from"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


COLOR_HEAD_CHOICES = ("regress", "blend")
FEATURE_EXTRACTOR_CHOICES = ("resunet", "alexnet")
RAY_ATTENTION_CHOICES = ("dense", "hash_quadratic", "hash_linear", "hash_linear_seed")
DATA_FORMAT_CHOICES = ("auto", "llff", "colmap", "transforms", "blender")

# shiftadd fields that change which modules (and parameters) a model has; the rest only tune training
_VARIANT_KEYS = ("ray_attention", "attention_linears", "ffn", "hash_bits", "shift_exponent_min", "shift_exponent_max",
                 "shift_channel_scale", "exclude")


def model_signature(cfg: Config) -> dict:
    """The config fields that define a model's modules and parameter shapes: checkpoints must match on all of them."""
    variant = {f"shiftadd.{k}": getattr(cfg.shiftadd, k) for k in _VARIANT_KEYS}
    for part in ("front_end", "head", "position_fusion"):  # only when on, so signatures of earlier checkpoints are unchanged
        if getattr(cfg.shiftadd, part) != "dense":
            variant[f"shiftadd.{part}"] = getattr(cfg.shiftadd, part)
    if cfg.shiftadd.int_activations:  # only when on, so signatures of earlier checkpoints are unchanged
        variant |= {"shiftadd.int_activations": cfg.shiftadd.int_activations, "shiftadd.act_scale": cfg.shiftadd.act_scale}
    return dataclasses.asdict(cfg.model) | {"dropout": None} | variant


def is_dense(cfg: Config) -> bool:
    s = cfg.shiftadd
    return s.ray_attention == "dense" and s.attention_linears == "dense" and s.ffn == "dense" and \
        s.front_end == "dense" and s.head == "dense" and s.position_fusion == "dense"
