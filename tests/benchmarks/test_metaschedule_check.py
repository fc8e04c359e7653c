"""benchmarks/metaschedule_check.py: each tuner probe runs in its own process and is recorded, crash or not."""
import json

import pytest

from conftest import load_benchmark

pytest.importorskip("tvm")


def test_probes_are_recorded_and_stop_at_the_first_failure(tmp_path):
    bench = load_benchmark("metaschedule_check")
    out = tmp_path / "ms.json"
    assert bench.main(["--out", str(out), "--timeout", "240"]) == 0
    record = json.loads(out.read_text())
    steps = [p["step"] for p in record["probes"]]
    assert steps == list(bench.STEPS[:len(steps)]) and steps
    assert all(p["finished"] for p in record["probes"][:-1])  # it went on only while the steps finished
    assert record["tuner_usable"] == (len(steps) == len(bench.STEPS) and record["probes"][-1]["finished"])
    for p in record["probes"]:
        assert p["finished"] == (p["returncode"] == 0)


def test_a_crashing_probe_is_a_result_not_a_crash(monkeypatch):
    bench = load_benchmark("metaschedule_check")
    monkeypatch.setattr(bench, "PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    result = bench.probe("context", timeout=60)
    assert result["finished"] is False and result["signal"] == 11
