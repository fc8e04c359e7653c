"""What one fused kernel leaf saves in a real frame: the same trained model with and without it, paired.

Frame-level speed on this shared 2-core machine drifts by 10-30% between runs and hours, so a leaf's gain is
measured as a difference inside one process: the checkpoint's model is copied once per setting, each copy gets
the kernels (`kernels.apply.use_kernels_`) with some leaf types kept on PyTorch (`filter_fn`), and the copies
render held-out view `--view` at `eval.stride` 2 in turns, round after round (`--rounds`), so every setting sees
the same machine state. Every copy must run every kernel it was given (a fallback fails the run).

  python benchmarks/leaf_ablation.py --config configs/fern_blend.yaml --runs-dir outputs \
      --variants a_dense h_int8_shift_ffn --without PositionFusion PreNormViewAttention --rounds 5 \
      --out results/leaf_ablation_cpu.json

Settings per variant: all leaves on the kernels; each `--without` type alone on PyTorch; all of them on PyTorch.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.runtime import quiet_openmp_workers  # noqa: E402 (before torch: libgomp reads it once)

quiet_openmp_workers()

import torch  # noqa: E402

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment, write_record  # noqa: E402
from gnt_shiftadd.evaluation.timing import render_heldout  # noqa: E402
from gnt_shiftadd.runtime import tune_cpu_allocator  # noqa: E402
from gnt_shiftadd.training.checkpoint import config_of_checkpoint  # noqa: E402
from gnt_shiftadd.workflows import load_trained  # noqa: E402
from kernels.apply import KernelConfig, kernel_leaf_types, use_kernels_  # noqa: E402
from kernels.build import match_tvm_threads_to_torch  # noqa: E402
from kernels.dispatch import all_kernels_required  # noqa: E402


def leaf_types(names: list[str]) -> dict[str, type]:
    """Module types with a kernel handler, by class name; ValueError naming the unknown ones and the known ones."""
    known = kernel_leaf_types()
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"--without: no kernel leaf for {unknown}; leaf types with kernels: {sorted(known)}")
    return {name: known[name] for name in names}


def settings(without: dict[str, type]) -> dict[str, tuple[type, ...]]:
    """setting name -> the leaf types it keeps on PyTorch."""
    result = {"all kernels": ()}
    result.update({f"without {name}": (cls,) for name, cls in without.items()})
    if len(without) > 1:
        result["without " + " + ".join(without)] = tuple(without.values())
    return result


@torch.no_grad()
def ablate(checkpoint: str, overrides: list[str], without: dict[str, type], view: int, rounds: int) -> dict:
    cfg = load_config(None, ["eval.stride=2", "render.kernels=torch", *overrides], base=config_of_checkpoint(checkpoint))
    base, tensors, _ = load_trained(cfg, checkpoint)
    models = {}
    for name, kept in settings(without).items():
        model = copy.deepcopy(base).eval()
        use_kernels_(model, KernelConfig("tvm"), (lambda m, _fqn, kept=kept: not isinstance(m, kept)) if kept else None)
        render_heldout(model, tensors, cfg, view)  # warm-up: builds or loads the kernels
        models[name] = model
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            with all_kernels_required(model):
                tic = time.perf_counter()
                render_heldout(model, tensors, cfg, view)
                times[name].append((time.perf_counter() - tic) * 1e3)
    medians = {name: statistics.median(ms) for name, ms in times.items()}
    full = medians["all kernels"]
    return {"checkpoint": checkpoint, "ms": times, "median_ms": medians,
            "saved_ms": {name: ms - full for name, ms in medians.items() if name != "all kernels"},
            "saved_fraction": {name: (ms - full) / ms for name, ms in medians.items() if name != "all kernels"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fern_blend.yaml", help="names the runs: <runs-dir>/<name>_<variant>")
    parser.add_argument("--runs-dir", default="outputs")
    parser.add_argument("--variants", nargs="+", default=["a_dense", "h_int8_shift_ffn"])
    parser.add_argument("--without", nargs="+", required=True, help="leaf types to keep on PyTorch, e.g. PositionFusion")
    parser.add_argument("--view", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    without = leaf_types(args.without)
    config_name = Path(args.config).stem
    checkpoints = {v: Path(args.runs_dir) / f"{config_name}_{v}" / "checkpoints" / "latest.pt" for v in args.variants}
    missing = sorted(str(path) for path in checkpoints.values() if not path.exists())
    if missing:
        raise SystemExit(f"leaf_ablation: no checkpoint at {missing} (train the variant grid first)")
    tune_cpu_allocator()
    match_tvm_threads_to_torch()
    record = {"command": "python benchmarks/leaf_ablation.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(), "view": args.view, "stride": 2, "rounds": args.rounds, "variants": {}}
    for variant, path in checkpoints.items():
        result = ablate(str(path), args.overrides, without, args.view, args.rounds)
        record["variants"][variant] = result
        for name, ms in result["median_ms"].items():
            saved = result["saved_ms"].get(name)
            print(f"{variant:20s} {name:50s} {ms:8.0f} ms" + (f"  (the leaves save {saved:.0f} ms)" if saved else ""),
                  flush=True)
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
