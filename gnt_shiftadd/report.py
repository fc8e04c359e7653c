"""PSNR vs latency vs energy for every ShiftAdd variant on one scene: the comparison the user asks for, in one call.

    run_report(cfg, out_dir, teacher=None)      # run_nerf.py report --config ... --out DIR

Steps, each reused when the report is run again (an interrupted report continues where it stopped):
  1. the dense teacher: `teacher` if given, else trained here for cfg.train.steps (a resumable run);
  2. the variant grid (`variants.run_variant_grid`): every configs/shiftadd/*.yaml (or cfg.report.variants)
     converted from the teacher and fine-tuned for cfg.report.finetune_steps, held-out PSNR/SSIM/LPIPS, op
     counts and the unit-energy estimate; written to <out>/grid.json;
  3. render latency per variant on this device: the PyTorch reference and, when TVM is available, the TVM
     kernels, in the same run on the same machine (median of cfg.report.latency_repeats renders of one
     held-out view at cfg.eval.stride, after a warm-up render);
  4. <out>/report.json, report.md, psnr_vs_latency.png, psnr_vs_energy.png and crops.png (the same crop of
     that held-out view rendered by every variant, next to the ground truth).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from gnt_shiftadd.config import Config, ConfigError
from gnt_shiftadd.evaluation.evaluate import environment
from gnt_shiftadd.evaluation.metrics import psnr
from gnt_shiftadd.evaluation.report_plots import plot_crops, plot_psnr_vs
from gnt_shiftadd.evaluation.timing import frame_latency
from gnt_shiftadd.experiment import load_scene
from gnt_shiftadd.training.checkpoint import CheckpointError, read_checkpoint
from gnt_shiftadd.training.trainer import checkpoint_path, train
from gnt_shiftadd.variants import run_variant_grid, variant_config, variant_configs
from gnt_shiftadd.workflows import load_trained
from kernels.apply import use_kernels
from kernels.build import tvm_available, tvm_version
from renderer.video import save_png

__all__ = ["run_report", "report_markdown", "best_psnr_per_ms", "pareto_front"]


def _backends() -> list[str]:
    return ["torch", "tvm"] if tvm_available() else ["torch"]


def _file_stamp(path: Path) -> list:
    stat = os.stat(path)
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _report_view(cfg: Config) -> int:
    test_ids = [int(v) for v in load_scene(cfg).test_ids]
    if not test_ids:
        raise ConfigError(f"scene {cfg.data.scene} has no held-out views (data.llffhold={cfg.data.llffhold}); "
                          "the report needs at least one")
    index = cfg.report.view if cfg.report.view >= 0 else len(test_ids) // 2
    if index >= len(test_ids):
        raise ConfigError(f"report.view={cfg.report.view} but the scene has {len(test_ids)} held-out views")
    return test_ids[index]


def _prepare(cfg: Config, out_dir: Path) -> Config:
    base = copy.deepcopy(cfg)
    base.out_dir = cfg.report.runs_dir or str(out_dir / "runs")
    unknown = sorted(set(cfg.report.variants) - set(variant_configs()))
    if unknown:
        raise ConfigError(f"report.variants: unknown {unknown}; available: {', '.join(variant_configs())}")
    if cfg.report.finetune_steps < 1 or cfg.report.latency_repeats < 1:
        raise ConfigError("report.finetune_steps and report.latency_repeats must be >= 1")
    return base


def _check_same_scene(grid_json: Path, base: Config) -> None:
    """A report folder belongs to one scene and model: reusing its runs for another would mix them silently."""
    if not grid_json.exists():
        return
    try:
        earlier = json.loads(grid_json.read_text()).get("base_config", {})
    except json.JSONDecodeError as error:
        raise ConfigError(f"{grid_json} is not valid JSON ({error}); delete it to start the report afresh") from None
    for key in ("data", "model"):
        if earlier.get(key) is not None and earlier[key] != base.to_dict()[key]:
            raise ConfigError(f"{grid_json.parent} holds a report for another {key} setting "
                              f"(earlier: {_differences(earlier[key], base.to_dict()[key])}); use another --out")


def _differences(earlier: dict, now: dict) -> str:
    return ", ".join(f"{k}={earlier.get(k)!r} now {now.get(k)!r}" for k in sorted(set(earlier) | set(now))
                     if earlier.get(k) != now.get(k))


def _teacher(base: Config, teacher: str | Path | None, progress: bool) -> Path:
    if teacher is not None:
        teacher = Path(teacher)
        if not teacher.is_file():
            raise CheckpointError(f"report: teacher checkpoint {teacher} does not exist")
        return teacher
    dense = copy.deepcopy(base)
    dense.name = f"{base.name}_teacher"
    finished = checkpoint_path(dense)
    if finished.exists() and read_checkpoint(finished)["step"] >= dense.train.steps:
        return finished  # trained by an earlier run of the report
    return train(dense, resume="auto", progress=progress).checkpoint


def _measure(name: str, entry: dict, base: Config, view: int, out_dir: Path, previous: dict | None) -> dict:
    """Latency of one variant on every backend; reused while the checkpoint, the device and the allocator setting
    are unchanged (report.remeasure=true times again, e.g. after changing a kernel)."""
    ckpt = Path(entry["checkpoint"])
    env = environment()
    stamp, device = _file_stamp(ckpt), [env["device"], env["cpu_allocator_tuned"]]
    backends = _backends()
    if previous and not base.report.remeasure and previous.get("checkpoint_stamp") == stamp \
            and previous.get("device") == device \
            and set(previous.get("ms_per_frame", {})) == set(backends) and previous.get("view") == view \
            and all((out_dir / "renders" / f"{name}_{b}.png").exists() for b in backends) \
            and (out_dir / "renders" / "ground_truth.png").exists():
        return previous
    result = {"checkpoint_stamp": stamp, "device": device, "view": view, "ms_per_frame": {}, "frame_psnr": {},
              "kernels_ran": {}}
    cfg = variant_config(base, name, Path(entry["config"]), base.report.finetune_steps)
    cfg.render.kernels = "torch"
    reference, tensors, _ = load_trained(cfg, ckpt)  # checkpoint and scene read once for every backend
    target = tensors.images[view][::cfg.eval.stride, ::cfg.eval.stride]
    save_png(target, out_dir / "renders" / "ground_truth.png")
    for backend in backends:
        model = reference
        if backend != "torch":
            model = copy.deepcopy(reference)
            use_kernels(model, backend, cfg.render.gemm)
        # a "tvm" row fails (KernelFallbackError) if any module fell back to the reference, and records what ran
        seconds, image, ran = frame_latency(model, tensors, cfg, view, base.report.latency_repeats,
                                            require_kernels=backend != "torch")
        result["kernels_ran"][backend] = ran
        result["ms_per_frame"][backend] = seconds * 1e3
        result["frame_psnr"][backend] = float(psnr(image.clamp(0, 1), target))
        save_png(image, out_dir / "renders" / f"{name}_{backend}.png")
        result["resolution"] = [int(image.shape[1]), int(image.shape[0])]
    result["fastest_backend"] = min(result["ms_per_frame"], key=result["ms_per_frame"].get)
    return result


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (cost, psnr) no other point beats on both (lower cost, higher PSNR), cheapest first."""
    front = [n for n, (c, q) in points.items()
             if not any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for m, (c2, q2) in points.items() if m != n)]
    return sorted(front, key=lambda n: points[n][0])


def best_psnr_per_ms(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: r["psnr"] / r["ms_per_frame"])


def _rows(record: dict) -> list[dict]:
    rows = []
    dense_ms = None
    for name, entry in record["variants"].items():
        latency = entry.get("latency")
        if not latency:
            continue
        fastest = latency["fastest_backend"]
        row = {"variant": name, "psnr": entry["heldout_mean"]["psnr"], "ssim": entry["heldout_mean"]["ssim"],
               "lpips": entry["heldout_mean"].get("lpips"), "energy_mj": entry["ops"]["per_frame"]["energy_pj"] / 1e9,
               "energy_saving": entry.get("energy_saving_vs_a"), "backend": fastest,
               "ms_per_frame": latency["ms_per_frame"][fastest], "ms_torch": latency["ms_per_frame"]["torch"],
               "ms_tvm": latency["ms_per_frame"].get("tvm"), "frame_psnr": latency["frame_psnr"]}
        if name == "a_dense":
            dense_ms = latency["ms_per_frame"]["torch"]
        rows.append(row)
    for row in rows:
        row["speedup_vs_dense_torch"] = dense_ms / row["ms_per_frame"] if dense_ms else None
    return rows


def report_markdown(record: dict) -> str:
    rows = record["rows"]
    env = record["environment"]
    resolution = record.get("resolution")
    lines = [f"# PSNR vs latency vs energy: {record['scene']}", "",
             f"Device: **{env['device']}** (torch {env['torch']}{', TVM ' + env['tvm'] if env.get('tvm') else ''}). "
             f"Latency: median ms per rendered frame of held-out view {record['view']}"
             f"{f' at {resolution[0]}x{resolution[1]}' if resolution else ''}, same run, same machine. "
             f"PSNR/SSIM/LPIPS: mean over the held-out views. Energy: transformer and CNN arithmetic per "
             f"full-resolution frame at 45 nm unit energies.", "",
             "| variant | PSNR | SSIM | LPIPS | ms/frame (fastest) | backend | ms/frame PyTorch | ms/frame TVM | "
             "speed-up vs dense PyTorch | energy/frame (mJ) | energy saving |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lpips = f"{r['lpips']:.3f}" if r["lpips"] is not None else "n/a"
        tvm = f"{r['ms_tvm']:.0f}" if r["ms_tvm"] is not None else "n/a"
        speedup = f"{r['speedup_vs_dense_torch']:.2f}x" if r["speedup_vs_dense_torch"] else "n/a"
        saving = f"{100 * r['energy_saving']:.1f}%" if r["energy_saving"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {lpips} | {r['ms_per_frame']:.0f} | "
                     f"{r['backend']} | {r['ms_torch']:.0f} | {tvm} | {speedup} | {r['energy_mj']:.1f} | {saving} |")
    if rows:
        best = best_psnr_per_ms(rows)
        lines += ["", f"Best PSNR per millisecond: **{best['variant']}** ({best['psnr']:.2f} dB at "
                      f"{best['ms_per_frame']:.0f} ms/frame on {best['backend']}).",
                  f"Pareto front (no variant is both faster and better): {', '.join(record['pareto_latency'])}.",
                  f"Pareto front in energy: {', '.join(record['pareto_energy'])}."]
    lines += ["", "![PSNR vs latency](psnr_vs_latency.png) ![PSNR vs energy](psnr_vs_energy.png)", "",
              "![crops](crops.png)", ""]
    return "\n".join(lines)


def run_report(cfg: Config, out_dir: str | Path, teacher: str | Path | None = None, progress: bool = True) -> dict:
    """Build (or bring up to date) the report in `out_dir`; returns the record written to report.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = _prepare(cfg, out_dir)
    _check_same_scene(out_dir / "grid.json", base)
    view = _report_view(base)
    teacher_ckpt = _teacher(base, teacher, progress)
    grid = run_variant_grid(base, teacher_ckpt, base.report.finetune_steps, out_dir / "grid.json",
                            only=base.report.variants or None, progress=progress)
    report_path = out_dir / "report.json"
    previous = json.loads(report_path.read_text()) if report_path.exists() else {}
    env = environment()
    if tvm_available():
        env["tvm"] = tvm_version()
    record = {"scene": str(base.data.scene), "teacher": str(teacher_ckpt), "view": view, "environment": env,
              "finetune_steps": base.report.finetune_steps, "eval_stride": base.eval.stride, "variants": {}}
    names = [n for n in grid["variants"] if not base.report.variants or n in base.report.variants]
    for name in tqdm(names, desc="latency", disable=not progress):
        entry = copy.deepcopy(grid["variants"][name])
        old = previous.get("variants", {}).get(name, {}).get("latency")
        entry["latency"] = _measure(name, entry, base, view, out_dir, old)
        record["variants"][name] = entry
        report_path.write_text(json.dumps(record, indent=2))  # an interrupted report keeps what it measured
    rows = _rows(record)
    record["rows"] = rows
    record["resolution"] = next(iter(record["variants"].values()))["latency"]["resolution"] if rows else None
    record["pareto_latency"] = pareto_front({r["variant"]: (r["ms_per_frame"], r["psnr"]) for r in rows})
    record["pareto_energy"] = pareto_front({r["variant"]: (r["energy_mj"], r["psnr"]) for r in rows})
    if rows:
        record["best_psnr_per_ms"] = best_psnr_per_ms(rows)["variant"]
    plot_psnr_vs(rows, "latency", env["device"], out_dir / "psnr_vs_latency.png")
    plot_psnr_vs(rows, "energy", env["device"], out_dir / "psnr_vs_energy.png")
    plot_crops(out_dir / "renders", [r["variant"] for r in rows], {r["variant"]: r for r in rows}, env["device"],
               base.report.crop, out_dir / "crops.png")
    report_path.write_text(json.dumps(record, indent=2))
    (out_dir / "report.md").write_text(report_markdown(record))
    return record

