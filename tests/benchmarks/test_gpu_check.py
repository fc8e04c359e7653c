"""The one-command GPU check, dry-run on the CPU (benchmarks/gpu_check.sh --dry-run): the same stages at tiny
sizes with llvm AOT kernels and TVM's compiler blocked, as on the GPU machine; and train.max_minutes."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytest.importorskip("tvm")


def test_a_wall_clock_budget_stops_training_with_a_checkpoint(tiny_config):
    from gnt_shiftadd.training.trainer import train

    cfg = tiny_config("train.steps=100000", "train.max_minutes=0.002", "train.val_every=0", "train.ckpt_every=100000")
    result = train(cfg, progress=False)
    assert 1 <= result.step < 100000 and result.checkpoint.is_file()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash + timeout")
def test_the_dry_run_runs_every_stage_on_aot_kernels_without_the_compiler(tmp_path):
    carry, out = tmp_path / "carry", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "900"}
    prepared = subprocess.run([sys.executable, "benchmarks/prepare_gpu_carry.py", "--dry-run", "--no-wheels",
                               "--carry", str(carry)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    manifest = json.loads((carry / "kernels_llvm" / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "llvm" and manifest["kernels"]
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--carry", str(carry), str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["stage"]: s["status"] for s in summary["stages"]}
    assert all(statuses[name] == "ok" for name in ("env", "kernel_tests", "kernels_selfcheck", "train", "latency")), \
        statuses
    env_record = json.loads((out / "env.json").read_text())
    assert env_record["tvm_compiler_importable"] is False  # like the GPU machine: runtime + AOT kernels only
    trained = json.loads((out / "train.json").read_text())
    assert trained["steps"] >= 1 and trained["heldout_mean"]["psnr"] > 0
    rows = {r["label"]: r for r in json.loads((out / "latency.json").read_text())["rows"]}
    for variant in ("a_dense", "c_hash_shift_linears"):
        reference, kernels = rows[f"{variant}, PyTorch reference"], rows[f"{variant}, TVM kernels"]
        assert "error" not in kernels and "skipped" not in kernels, kernels
        ran = {how for kernels_ran in kernels["kernels_ran"].values() for how in kernels_ran.values()}
        assert "reference" not in ran and "tvm" in ran  # every kernel came from the AOT folder
        assert kernels["frame_psnr"] == pytest.approx(reference["frame_psnr"], abs=1e-3)
