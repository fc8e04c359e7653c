"""The stages of the one-command GPU check (benchmarks/gpu_check.sh runs them, each under its own timeout).

  env      device, library versions, where the kernels come from                     -> OUT/env.json
  kernels  every kernel against its reference on the device (kernels/selfcheck.py)   -> OUT/selfcheck.json
  train    train cfg for a wall-clock budget (train.max_minutes), then held-out PSNR/SSIM/LPIPS -> OUT/train.json
  latency  one held-out frame: dense GNT eager fp32, bf16 autocast, torch.compile (bf16), and every ShiftAdd
           variant (converted from the trained model, no fine-tuning) on the PyTorch reference and on the TVM
           kernels (AOT on the GPU machine), ms/frame and frame PSNR per row                    -> OUT/latency.json
  summary  one JSON with every stage's status and the headline numbers                     -> OUT/gpu_check.json

Each stage writes its own file, so a failure or timeout in one still leaves the others' results. Every row says
which arithmetic path it ran (cuBLAS fp32, bf16 tensor cores, Inductor, TVM CUDA cores).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.metrics import psnr  # noqa: E402
from gnt_shiftadd.evaluation.timing import median_seconds, render_heldout  # noqa: E402
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene, resolve_device  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import reparameterize  # noqa: E402
from gnt_shiftadd.training.checkpoint import read_checkpoint  # noqa: E402
from gnt_shiftadd.training.warm_start import calibration_forward  # noqa: E402
from gnt_shiftadd.variants import variant_configs  # noqa: E402
from kernels.aot import AOT_ENV, MANIFEST_NAME, RUNTIME_ENV  # noqa: E402
from kernels.apply import KernelConfig, use_kernels_  # noqa: E402
from kernels.dispatch import all_kernels_required  # noqa: E402

PATHS = {  # which arithmetic each row runs on a GPU (on a CPU: the same code paths, MKL/oneDNN instead)
    "eager_fp32": "PyTorch eager fp32 (cuBLAS SGEMM/TF32 off, CUDA cores)",
    "eager_bf16": "PyTorch eager under bf16 autocast (cuBLAS bf16 tensor cores)",
    "compile_bf16": "torch.compile (Inductor/Triton) of the transformer under bf16 autocast",
    "reference": "PyTorch reference of the variant fp32 (decoded +-2^k weights through cuBLAS, eager)",
    "tvm": "TVM kernels fp32 (AOT-compiled CUDA, CUDA cores; no tensor cores yet)",
}


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("tvm_ffi", "kornia"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"


def stage_env(args) -> dict:
    device = resolve_device(args.device)
    record = {"device": _device_name(device), "device_type": device.type, "versions": _versions(),
              "aot_kernels": os.environ.get(AOT_ENV), "tvm_runtime": os.environ.get(RUNTIME_ENV),
              "tvm_compiler_importable": _tvm_compiler_importable()}
    if device.type == "cuda":
        record["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
        record["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        try:
            record["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            record["nvidia_smi"] = f"unavailable: {error}"
    _write(args.out / "env.json", record)
    print(json.dumps(record, indent=1))
    return record


def _tvm_compiler_importable() -> bool:
    try:
        import tvm  # noqa: F401  (only asks; the check itself never needs it)
    except ImportError:
        return False
    return True


def stage_kernels(args) -> dict:
    from kernels.selfcheck import run_checks  # noqa: PLC0415 (imports every kernel module)

    device = resolve_device(args.device)
    folder = os.environ.get(AOT_ENV)
    manifest = Path(folder or "") / MANIFEST_NAME
    if folder and not _tvm_compiler_importable() and manifest.is_file() \
            and not json.loads(manifest.read_text()).get("description", {}).get("self_check", True):
        record = {"device": _device_name(device), "skipped": f"{folder} was exported without the self-check kernels"}
        _write(args.out / "selfcheck.json", record)
        print(record["skipped"])
        return record
    checks = [c.summary() for c in run_checks(device, quick=args.quick)]
    failed = [c["label"] for c in checks if not c["ok"] or set(c["ran"].values()) != {"tvm"}]
    record = {"device": _device_name(device), "checks": checks, "passed": len(checks) - len(failed),
              "failed": failed}
    _write(args.out / "selfcheck.json", record)
    print(f"{record['passed']} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return record


def _config(args, extra: list[str] = ()):
    return load_config(args.config, [*args.overrides, *extra])


def stage_train(args) -> dict:
    from gnt_shiftadd.training.trainer import train  # noqa: PLC0415
    from gnt_shiftadd.workflows import run_eval  # noqa: PLC0415

    cfg = _config(args, [f"out_dir={args.out / 'runs'}", f"train.max_minutes={args.minutes}", f"device={args.device}"])
    record = {"config": str(args.config), "overrides": args.overrides, "budget_minutes": args.minutes,
              "device": _device_name(resolve_device(args.device)), "versions": _versions()}
    tic = time.perf_counter()
    result = train(cfg, progress=False)
    record.update(train_seconds=time.perf_counter() - tic, steps=result.step,
                  rays_per_step=cfg.train.n_rand, checkpoint=str(result.checkpoint),
                  last_losses={str(k): v for k, v in list(result.losses.items())[-5:]})
    _write(args.out / "train.json", record)  # the training result survives an evaluation that runs out of time
    tic = time.perf_counter()
    metrics = run_eval(cfg, result.checkpoint, progress=False)
    record.update(eval_seconds=time.perf_counter() - tic, heldout_mean=metrics.get("mean"),
                  heldout_views=metrics.get("views", metrics.get("per_view")),
                  nearest_source_psnr=metrics.get("nearest_source_psnr"))
    _write(args.out / "train.json", record)
    print(json.dumps({k: record[k] for k in ("steps", "train_seconds", "eval_seconds", "heldout_mean")}, indent=1,
                     default=str))
    return record


def _teacher(cfg, args, device):
    """The trained dense model of the train stage (or random weights when it did not finish)."""
    model = build_model(cfg, device)
    note = "random initialisation (no trained checkpoint)"
    if args.teacher and Path(args.teacher).is_file():
        model.load_state_dict(read_checkpoint(args.teacher)["model"])
        note = f"trained checkpoint {args.teacher}"
    return model.eval(), note


def _frame(model, tensors, cfg, view, repeats, mode: str, kernels: bool) -> dict:
    device = tensors.device
    autocast = "bf16" if mode in ("eager_bf16", "compile_bf16") else "none"
    render_cfg = copy.deepcopy(cfg)
    render_cfg.render.autocast = autocast
    frames = []

    def render():
        frames[:] = [render_heldout(model, tensors, render_cfg, view)]

    ran: dict = {}
    tic = time.perf_counter()
    if kernels:
        with all_kernels_required(model) as ran:  # a "tvm" row fails if anything fell back to the reference
            render()
            seconds = median_seconds(render, device, repeats, warmup=0)
    else:
        render()  # warm-up (torch.compile compiles here)
        seconds = median_seconds(render, device, repeats, warmup=0)
    image = frames[0].float().clamp(0, 1)
    stride = cfg.eval.stride
    target = torch.from_numpy(tensors.scene.images[view][::stride, ::stride]).to(image.device).float()
    return {"ms_per_frame": seconds * 1e3, "frame_psnr": float(psnr(image, target)), "path": PATHS[mode],
            "kernels_ran": ran, "frame": list(image.shape[:2]), "wall_seconds": time.perf_counter() - tic}


def _exported_variants() -> list[str] | None:
    """The variants the AOT folder in use was exported for (others would fall back to the reference)."""
    folder = os.environ.get(AOT_ENV)
    manifest = Path(folder or "") / MANIFEST_NAME
    if not folder or not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("description", {}).get("variants") or None


def stage_latency(args) -> dict:
    device = resolve_device(args.device)
    cfg = _config(args, [f"device={args.device}"])
    scene = load_scene(cfg)
    tensors = SceneTensors(scene, device)
    view = int(scene.test_ids[min(1, len(scene.test_ids) - 1)])
    record = {"device": _device_name(device), "versions": _versions(), "config": str(args.config),
              "overrides": args.overrides, "view": view, "eval_stride": cfg.eval.stride, "repeats": args.repeats,
              "rows": []}
    out = args.out / "latency.json"
    deadline = time.perf_counter() + args.budget_seconds
    teacher, record["weights"] = _teacher(cfg, args, device)

    def add(label: str, model_fn, mode: str, kernels: bool = False) -> dict | None:
        if time.perf_counter() > deadline:
            record["rows"].append({"label": label, "skipped": "out of the stage's time budget"})
            return None
        try:
            with torch.no_grad():
                row = {"label": label, **_frame(model_fn(), tensors, cfg, view, args.repeats, mode, kernels)}
        except Exception as error:  # one failing row must not lose the others
            row = {"label": label, "error": f"{type(error).__name__}: {error}"[:2000]}
        record["rows"].append(row)
        _write(out, record)
        print({k: row.get(k) for k in ("label", "ms_per_frame", "frame_psnr", "error", "skipped")}, flush=True)
        return row

    def compiled():
        model = copy.deepcopy(teacher)
        model.transformer = torch.compile(model.transformer, dynamic=False)
        return model

    add("dense GNT, PyTorch eager fp32", lambda: teacher, "eager_fp32")
    if device.type == "cuda" or args.all_peers:
        add("dense GNT, bf16 autocast", lambda: teacher, "eager_bf16")
    wanted = args.variants or _exported_variants()
    record["variants"] = wanted or "all"
    for name, path in variant_configs().items():
        if wanted and name not in wanted:
            continue
        variant_cfg = load_config(path, [], base=copy.deepcopy(cfg))
        model = copy.deepcopy(teacher)
        reparameterize(model, variant_cfg.shiftadd, calibration_forward(model, tensors, variant_cfg))
        model.eval()
        add(f"{name}, PyTorch reference", lambda: model, "reference")
        kernel_model = copy.deepcopy(model)
        use_kernels_(kernel_model, KernelConfig(backend="tvm", gemm="auto"))
        add(f"{name}, TVM kernels", lambda: kernel_model, "tvm", kernels=True)
    if not args.skip_compile:  # last: its compilation takes the longest, and the budget guard may skip it
        add("dense GNT, torch.compile bf16", compiled, "compile_bf16")
    timed = {r["label"]: r["ms_per_frame"] for r in record["rows"] if "ms_per_frame" in r}
    dense = {k: v for k, v in timed.items() if k.startswith("dense")}
    if dense:
        fastest = min(dense, key=dense.get)
        for row in record["rows"]:
            if "ms_per_frame" in row:
                row["speedup_vs_dense_eager_fp32"] = timed.get("dense GNT, PyTorch eager fp32", float("nan")) / row["ms_per_frame"]
                row["speedup_vs_fastest_dense"] = dense[fastest] / row["ms_per_frame"]
        record["fastest_dense"] = fastest
    _write(out, record)
    return record


def stage_summary(args) -> dict:
    """gpu_check.json: the stages' statuses (from stages.tsv written by gpu_check.sh) and what they found."""
    stages = []
    table = args.out / "stages.tsv"
    if table.is_file():
        for line in table.read_text().splitlines():
            name, rc, seconds, timeout = (line.split("\t") + ["", "", "", ""])[:4]
            status = "ok" if rc == "0" else ("timed out" if rc in ("124", "137") else f"failed (rc {rc})")
            stages.append({"stage": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                           "seconds": float(seconds or 0), "timeout_s": timeout})
    found = {}
    for name in ("env", "selfcheck", "train", "latency"):
        path = args.out / f"{name}.json"
        found[name] = json.loads(path.read_text()) if path.is_file() else None
    summary = {"command": args.command_line, "dry_run": args.dry_run, "stages": stages,
               "device": (found["env"] or {}).get("device"), "versions": (found["env"] or {}).get("versions"),
               "kernel_checks": None if found["selfcheck"] is None else
               {k: found["selfcheck"].get(k) for k in ("passed", "failed", "skipped")},
               "train": None if found["train"] is None else
               {k: found["train"].get(k) for k in ("steps", "train_seconds", "heldout_mean", "budget_minutes")},
               "latency": None if found["latency"] is None else
               [{k: r.get(k) for k in ("label", "ms_per_frame", "frame_psnr", "speedup_vs_fastest_dense", "path",
                                       "error", "skipped")} for r in found["latency"]["rows"]]}
    _write(args.out / "gpu_check.json", summary)
    print(json.dumps(summary, indent=1, default=str))
    return summary


STAGES = {"env": stage_env, "kernels": stage_kernels, "train": stage_train, "latency": stage_latency,
          "summary": stage_summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, required=True, help="folder for the stage's JSON")
    parser.add_argument("--config", default="configs/fern_gpu.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--minutes", type=float, default=3.5, help="train: wall-clock budget")
    parser.add_argument("--teacher", help="latency: trained dense checkpoint (default: random weights)")
    parser.add_argument("--repeats", type=int, default=2, help="latency: timed renders per row (median)")
    parser.add_argument("--budget-seconds", type=float, default=120.0, help="latency: stop adding rows after this")
    parser.add_argument("--variants", type=lambda text: [v for v in text.split(",") if v],
                        help="latency: only these configs/shiftadd variants (comma-separated)")
    parser.add_argument("--skip-compile", action="store_true", help="latency: no torch.compile row")
    parser.add_argument("--all-peers", action="store_true", help="latency: bf16 row on CPU too")
    parser.add_argument("--quick", action="store_true", help="kernels: small sizes only")
    parser.add_argument("--dry-run", action="store_true", help="summary: this was the CPU dry run")
    parser.add_argument("--command-line", default=" ".join(shlex.quote(a) for a in sys.argv))
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    args.out.mkdir(parents=True, exist_ok=True)
    STAGES[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
