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
