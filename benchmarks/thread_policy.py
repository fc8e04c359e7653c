"""Does OpenMP's spin-waiting slow the TVM kernels down? Frame times per row under several libgomp wait policies.

PyTorch's CPU ops run on GNU OpenMP (libgomp), whose idle worker threads spin for a while after every parallel
region before they sleep; the TVM kernels run on TVM's own thread pool. On a machine with as many threads as cores,
a TVM kernel launched right after a PyTorch op then shares its cores with spinning OpenMP workers (and the other
way round: TVM's pool workers spin too). libgomp reads its policy once, when torch is imported, so each setting runs in a fresh process.

  python benchmarks/thread_policy.py --config configs/fern_blend.yaml --runs-dir outputs \
      --rows a_dense:torch a_dense:tvm h_int8_shift_ffn:tvm --out results/thread_policy_cpu.json [--repeats 5]

Each row is `<variant>:<backend>[:key=value,...]` (config overrides, e.g. render.gemm=tvm) with the checkpoint `<runs-dir>/<config name>_<variant>/checkpoints/latest.pt`
(the variant grid's runs); every (policy, row) is timed in its own process: one warm-up render of held-out view
`--view` at `eval.stride` 2, then the median of `--repeats` renders. Policies:
  default    libgomp's own (spins, then sleeps)
  passive    OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep at once)
  spin=N     GOMP_SPINCOUNT=N (libgomp's spin before sleeping)
  tvmspin=N  TVM_THREAD_POOL_SPIN_COUNT=N (TVM's thread pool workers' spin; its default is 300,000)
and comma-separated combinations of them.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICY_ENV = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TVM_THREAD_POOL_SPIN_COUNT")

CHILD = """
import contextlib, json, statistics, sys, time
import torch
from gnt_shiftadd.config import load_config
from gnt_shiftadd.evaluation.timing import render_heldout
from gnt_shiftadd.runtime import tune_cpu_allocator
from gnt_shiftadd.training.checkpoint import config_of_checkpoint
from gnt_shiftadd.workflows import load_trained
from kernels.build import match_tvm_threads_to_torch
from kernels.dispatch import all_kernels_required

ckpt, backend, view, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
overrides = [item for item in sys.argv[5].split(",") if item]
tune_cpu_allocator()
match_tvm_threads_to_torch()
cfg = load_config(None, ["eval.stride=2", f"render.kernels={backend}", *overrides], base=config_of_checkpoint(ckpt))
model, tensors, _ = load_trained(cfg, ckpt)
times = []
with torch.no_grad():
    render_heldout(model, tensors, cfg, view)
    for _ in range(repeats):  # a row timed as tvm fails if anything fell back to the reference
        with all_kernels_required(model) if backend == "tvm" else contextlib.nullcontext():
            tic = time.perf_counter()
            render_heldout(model, tensors, cfg, view)
            times.append(time.perf_counter() - tic)
print("RESULT " + json.dumps({"ms": [t * 1e3 for t in times], "median_ms": statistics.median(times) * 1e3,
                              "torch_threads": torch.get_num_threads()}))
"""


def policy_env(policy: str) -> dict:
    """The environment of a policy: comma-separated settings, e.g. "spin=10000,tvmspin=10000"."""
    env: dict = {}
    for setting in policy.split(","):
        if setting in POLICY_ENV:
            env.update(POLICY_ENV[setting])
        elif setting.startswith("spin=") and setting[5:].isdigit():
            env["GOMP_SPINCOUNT"] = setting[5:]
        elif setting.startswith("tvmspin=") and setting[8:].isdigit():
            env["TVM_THREAD_POOL_SPIN_COUNT"] = setting[8:]
        else:
            raise ValueError(f"unknown policy setting {setting!r}: use default, passive, spin=<count> or "
                             "tvmspin=<count>, comma-separated")
    return env


def time_row(checkpoint: Path, backend: str, policy: str, view: int, repeats: int, overrides: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _POLICY_VARIABLES} | policy_env(policy)
    done = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), backend, str(view), str(repeats),
                           overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{checkpoint} ({backend}, {policy}) failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fern_blend.yaml")
    parser.add_argument("--runs-dir", default="outputs")
    parser.add_argument("--rows", nargs="+", required=True,
                        help="<variant>:<backend>[:key=value,...] (backend torch or tvm; optional config overrides)")
    parser.add_argument("--policies", nargs="+", default=["default", "passive", "spin=10000"])
    parser.add_argument("--view", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for policy in args.policies:
        policy_env(policy)  # refuse a bad name before any timing
    import yaml  # noqa: PLC0415

    name = yaml.safe_load(Path(args.config).read_text())["name"]
    rows = []
    for spec in args.rows:
        variant, _, rest = spec.partition(":")
        backend, _, overrides = rest.partition(":")
        if backend not in ("torch", "tvm"):
            parser.error(f"--rows {spec!r}: write <variant>:torch or <variant>:tvm")
        checkpoint = Path(args.runs_dir) / f"{name}_{variant}" / "checkpoints" / "latest.pt"
        if not checkpoint.is_file():
            parser.error(f"--rows {spec!r}: no checkpoint {checkpoint}")
        for policy in args.policies:
            result = time_row(checkpoint, backend, policy, args.view, args.repeats, overrides)
            rows.append({"row": spec, "checkpoint": str(checkpoint), "policy": policy, "env": policy_env(policy),
                         **result})
            print(f"{spec:28s} {policy:12s} {result['median_ms']:8.0f} ms/frame", flush=True)
    from gnt_shiftadd.evaluation.evaluate import environment  # noqa: PLC0415 (imports torch: after the children)

    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "environment": environment(),
              "view": args.view, "stride": 2, "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"recorded in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
