"""Can this TVM build's MetaSchedule tuner run at all? (issue 14 asks for MetaSchedule where it beats the hand
schedules, with the tuning records kept in the repository.)

  python benchmarks/metaschedule_check.py --out results/metaschedule_check_cpu.json

Each probe runs in a fresh subprocess (a crash in the tuner must not take the check down) and gets harder step by
step on the smallest real workload, a 512x64 by 64x128 fp32 product:
  1. context    build a TuneContext (post-order-apply space) for it;
  2. space      generate its design space;
  3. tune       tune_tir with 8 trials (random cost model, in-memory database).
The JSON records, per probe, whether it finished, the exit status (a negative status is the signal that killed
it: -11 is a segmentation fault) and the last lines of its output, with the TVM version and the command. The
hand schedules in kernels/ are the answer wherever the tuner cannot run.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import sys, tempfile
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((512, 64), name="a")
    b = te.placeholder((64, 128), name="b")
    k = te.reduce_axis((0, 64), "k")
    c = te.compute((512, 128), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")})
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    step = sys.argv[1]
    if step in ("context", "space"):
        context = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                                 search_strategy="replay-trace", task_name="main")
        if step == "space":
            print("design spaces:", len(context.space_generator.generate_design_space(mod)))
    else:
        database = ms.tune_tir(mod, target, tempfile.mkdtemp(), max_trials_global=8, num_trials_per_iter=8,
                               cost_model="random", database="memory")
        print("tuned:", database is not None)
    print("finished", step)
""")
STEPS = ("context", "space", "tune")


def probe(step: str, timeout: float) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, step], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"step": step, "finished": False, "returncode": None, "reason": f"timed out after {timeout:.0f} s"}
    output = (done.stdout + done.stderr).strip().splitlines()
    tail = [line for line in output if not line.lstrip().startswith("File ")][-6:]
    frames = [line.strip() for line in output if "tvm::" in line][:3]
    return {"step": step, "finished": done.returncode == 0, "returncode": done.returncode,
            "signal": -done.returncode if done.returncode < 0 else None, "output_tail": tail, "tvm_frames": frames}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per probe")
    args = parser.parse_args(argv)
    import tvm  # noqa: PLC0415 (only for the version; the probes import it themselves)
    from gnt_shiftadd.evaluation.evaluate import environment, write_record  # noqa: PLC0415 (torch only for the record)

    probes = []
    for step in STEPS:
        result = probe(step, args.timeout)
        probes.append(result)
        status = "ok" if result["finished"] else f"FAILED (exit {result['returncode']})"
        print(f"{step:8s} {status}", flush=True)
        if not result["finished"]:
            break  # each step needs the one before it
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "environment": environment(),
              "tvm": tvm.__version__, "tuner_usable": all(p["finished"] for p in probes)
              and len(probes) == len(STEPS), "probes": probes}
    write_record(args.out, record, note=f"tuner usable: {record['tuner_usable']}; recorded in")
    return 0


if __name__ == "__main__":
    sys.exit(main())
