"""The ShiftAdd variant grid (configs/shiftadd/*.yaml): convert one trained GNT into every variant, fine-tune each
for the same extra steps, evaluate, count ops and energy, and tabulate. Re-running reuses finished variants.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from gnt_shiftadd.config import Config, load_config
from gnt_shiftadd.evaluation.baselines import trivial_baselines_for
from gnt_shiftadd.evaluation.evaluate import environment, evaluate
from gnt_shiftadd.experiment import SceneTensors, load_scene, resolve_device
from gnt_shiftadd.shiftadd.moe import MoEFeedForward
from gnt_shiftadd.evaluation.opcount import count_frame_ops
from gnt_shiftadd.training.trainer import checkpoint_path
from gnt_shiftadd.training.warm_start import warm_start
from gnt_shiftadd.workflows import load_trained, run_eval, run_finetune

VARIANT_DIR = Path(__file__).resolve().parents[1] / "configs" / "shiftadd"


def variant_configs(variant_dir: Path = VARIANT_DIR) -> dict[str, Path]:
    """name -> YAML file, in grid order (a_dense, b_..., ...)."""
    files = sorted(Path(variant_dir).glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no variant configs (*.yaml) in {variant_dir}")
    return {f.stem: f for f in files}


def variant_config(base: Config, name: str, path: Path, steps: int) -> Config:
    cfg = load_config(path, (), base=copy.deepcopy(base))
    cfg.name = f"{base.name}_{name}"
    cfg.train.steps = steps
    return cfg


def _moe_summary(model) -> dict | None:
    moes = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFeedForward)]
    if not moes:
        return None
    return {"expert_latency_mult_shift": moes[0][1].expert_latency.tolist(),
            "balance_coef": moes[0][1].balance_coef, "latency_weighting": moes[0][1].latency_weighting,
            "shift_fraction_per_layer": {n: float(m.routing_fractions()[-1]) for n, m in moes}}


def run_variant_grid(base: Config, teacher: str | Path, steps: int, out_json: str | Path,
                     only: list[str] | None = None, progress: bool = True) -> dict:
    """Fine-tune every variant from `teacher` for `steps` steps; evaluate; write `out_json` (+ a .md table) after
    each variant so an interrupted grid keeps what it finished."""
    out_json = Path(out_json)
    record = json.loads(out_json.read_text()) if out_json.exists() else {}
    record.update({"teacher": str(teacher), "extra_steps": steps, "environment": environment(),
                   "base_config": base.to_dict()})
    record.setdefault("variants", {})
    for name, path in variant_configs().items():
        if only and name not in only:
            continue
        cfg = variant_config(base, name, path, steps)
        done = record["variants"].get(name, {})
        if done.get("steps") == steps and checkpoint_path(cfg).exists():
            continue  # finished earlier
        result = run_finetune(cfg, teacher, progress=progress)
        metrics = run_eval(cfg, result.checkpoint, progress=progress)
        model, tensors, _ = load_trained(cfg, result.checkpoint, backend="torch")  # op counts hook the modules
        ops = count_frame_ops(model, tensors, cfg)
        record["variants"][name] = {"config": str(path), "shiftadd": copy.deepcopy(cfg.to_dict()["shiftadd"]),
                                    "steps": steps, "checkpoint": str(result.checkpoint), "heldout_mean": metrics["mean"],
                                    "ops": ops, "moe": _moe_summary(model)}
        _write(record, out_json)
    _count_dense_int8(record, base, steps)
    if "baselines" not in record:  # the trivial baselines on the same held-out views, scored as the variants are
        tensors = SceneTensors(load_scene(base), resolve_device(base.device))
        record["baselines"] = trivial_baselines_for(base, tensors)
    _write(record, out_json)
    return record


def _count_dense_int8(record: dict, base: Config, steps: int) -> None:
    """(a)'s op counts with its attention/FFN linears as dynamic int8 (the "saving vs dense int8" reference)."""
    dense = record["variants"].get("a_dense")
    if dense and "ops_dense_int8" not in dense:
        cfg = variant_config(base, "a_dense", variant_configs()["a_dense"], steps)
        model, tensors, _ = load_trained(cfg, dense["checkpoint"], backend="torch")
        dense["ops_dense_int8"] = count_frame_ops(model, tensors, cfg, int8_linears=True)


def recount_variant_ops(base: Config, out_json: str | Path, only: list[str] | None = None) -> dict:
    """Count ops and energy again for the variants `out_json` already holds (their recorded checkpoints), without
    fine-tuning or evaluating: for when the op counter or the model's arithmetic changed but not the weights
    (e.g. the blend head's split first layer). Rewrites out_json and its table; quality stays as recorded."""
    out_json = Path(out_json)
    if not out_json.exists():
        raise FileNotFoundError(f"{out_json}: no variant grid to recount (run the grid first)")
    record = json.loads(out_json.read_text())
    steps = record.get("extra_steps")
    for name, entry in record.get("variants", {}).items():
        if only and name not in only:
            continue
        checkpoint = Path(entry["checkpoint"])
        if not checkpoint.exists():
            raise FileNotFoundError(f"{out_json}: variant {name!r} names checkpoint {checkpoint}, which does not exist")
        cfg = variant_config(base, name, Path(entry["config"]), steps)
        model, tensors, _ = load_trained(cfg, checkpoint, backend="torch")
        entry["ops"] = count_frame_ops(model, tensors, cfg)
        entry.pop("ops_dense_int8", None)
    _count_dense_int8(record, base, steps)
    _write(record, out_json)
    return record


def conversion_quality(base: Config, teacher: str | Path, out_dir: str | Path, only: list[str] | None = None,
                       progress: bool = True) -> dict:
    """Held-out quality of every variant right after conversion from `teacher`, before any fine-tuning: how much
    ShiftAddViT's brief fine-tuning has to recover. {name: heldout mean metrics}; images under out_dir/<name>."""

    device = resolve_device(base.device)
    tensors = SceneTensors(load_scene(base), device)
    results = {}
    for name, path in variant_configs().items():
        if only and name not in only:
            continue
        cfg = variant_config(base, name, path, steps=0)
        torch.manual_seed(cfg.train.seed)  # the MoE router's initialisation
        model, _, _ = warm_start(cfg, teacher, tensors, device, progress=progress)
        results[name] = evaluate(model.eval(), tensors, cfg, Path(out_dir) / name, progress=progress)["mean"]
    return results


def _write(record: dict, out_json: Path) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    variants = record["variants"]
    reference = variants.get("a_dense")
    for entry in variants.values():
        if reference:
            ref = reference["ops"]["per_frame"]["energy_pj"]
            entry["energy_saving_vs_a"] = 1.0 - entry["ops"]["per_frame"]["energy_pj"] / ref
        if reference and "ops_dense_int8" in reference:
            ref_int8 = reference["ops_dense_int8"]["per_frame"]["energy_pj"]
            entry["energy_saving_vs_a_int8"] = 1.0 - entry["ops"]["per_frame"]["energy_pj"] / ref_int8
    out_json.write_text(json.dumps(record, indent=2))
    out_json.with_suffix(".md").write_text(markdown_table(record))


def markdown_table(record: dict) -> str:
    rows = ["| variant | PSNR | SSIM | LPIPS | mults/ray | adds/ray | shifts/ray | energy/frame (mJ) | saving vs (a) | "
            "saving vs (a) as int8 | shift-expert share |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in record["variants"].items():
        m, ops = entry["heldout_mean"], entry["ops"]
        lpips = f"{m['lpips']:.3f}" if m.get("lpips") is not None else "n/a"
        saving = f"{100 * entry['energy_saving_vs_a']:.1f}%" if "energy_saving_vs_a" in entry else "n/a"
        saving_int8 = f"{100 * entry['energy_saving_vs_a_int8']:.1f}%" if "energy_saving_vs_a_int8" in entry else "n/a"
        share = "-"
        if entry.get("moe"):
            fractions = list(entry["moe"]["shift_fraction_per_layer"].values())
            share = f"{100 * sum(fractions) / len(fractions):.0f}%"
        rows.append(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.3f} | {lpips} | {ops['per_ray']['mults']:,.0f} | "
                    f"{ops['per_ray']['adds']:,.0f} | {ops['per_ray']['shifts']:,.0f} | "
                    f"{ops['per_frame']['energy_pj'] / 1e9:.1f} | {saving} | {saving_int8} | {share} |")
    for name, label in (("nearest", "show the nearest training photo"), ("mean_image", "show the mean training photo")):
        if name in record.get("baselines", {}):
            m = record["baselines"][name]["mean"]
            lpips = f"{m['lpips']:.3f}" if m.get("lpips") is not None else "n/a"
            rows.append(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.3f} | {lpips} | - | - | - | - | - | - | - |")
    dense_int8 = record["variants"].get("a_dense", {}).get("ops_dense_int8")
    if dense_int8:
        rows.append(f"\n(a) as int8: the same dense model with its attention and FFN linears counted as dynamic int8 "
                    f"layers (int8 products, int32 sums, the same quantization overheads as the integer shift layers): "
                    f"{dense_int8['per_frame']['energy_pj'] / 1e9:.1f} mJ/frame.")
    return "\n".join(rows) + "\n"
