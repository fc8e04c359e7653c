"""The CPU allocator tuning: applied on glibc Linux, skipped on request, reported either way."""
import json
import os
import subprocess
import sys

import pytest

SNIPPET = "import json; from gnt_shiftadd.runtime import tune_cpu_allocator as t; print(json.dumps(t()))"


def _state(env_value):
    env = dict(os.environ)
    env.pop("SHIFTADD_GNT_MALLOC_TUNING", None)
    if env_value is not None:
        env["SHIFTADD_GNT_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_tuning_applies_and_can_be_disabled():
    assert _state(None) == {"tuned": True, "reason": "mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"}
    disabled = _state("0")
    assert disabled["tuned"] is False and "SHIFTADD_GNT_MALLOC_TUNING=0" in disabled["reason"]


OPENMP_SNIPPET = """
import json, os, sys
from gnt_shiftadd.runtime import openmp_policy, quiet_openmp_workers
note = quiet_openmp_workers()
import torch  # libgomp reads the policy now
late = quiet_openmp_workers({})  # too late for this process: said so, nothing set
print(json.dumps({"note": note, "policy": openmp_policy(), "late": late}))
"""


def _openmp(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | extra_env
    out = subprocess.run([sys.executable, "-c", OPENMP_SNIPPET], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_openmp_workers_are_quieted_before_torch_loads_and_a_user_policy_is_kept():
    fresh = _openmp({})
    assert fresh["note"] == "OMP_WAIT_POLICY=PASSIVE" and fresh["policy"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert "torch was imported" in fresh["late"]
    kept = _openmp({"GOMP_SPINCOUNT": "5000"})
    assert "kept" in kept["note"] and kept["policy"] == {"GOMP_SPINCOUNT": "5000"}


def test_results_record_the_openmp_policy():
    from gnt_shiftadd.evaluation.evaluate import environment

    assert "openmp_policy" in environment()
