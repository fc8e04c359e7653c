"""benchmarks/thread_policy.py: policies parsed (and refused) by name, each (row, policy) timed in its own process
with the policy's environment, results recorded with their settings."""
import json

import pytest

from conftest import load_benchmark


def test_policies_are_parsed_and_bad_ones_refused():
    policy = load_benchmark("thread_policy")
    assert policy.policy_env("default") == {}
    assert policy.policy_env("passive") == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert policy.policy_env("spin=10000,tvmspin=0") == {"GOMP_SPINCOUNT": "10000", "TVM_THREAD_POOL_SPIN_COUNT": "0"}
    with pytest.raises(ValueError, match="unknown policy setting 'lazy'"):
        policy.policy_env("lazy")


def test_a_row_is_timed_under_each_policy(tiny_config, tmp_path):
    from gnt_shiftadd.training.trainer import train

    runs = tmp_path / "runs"
    train(tiny_config("train.steps=1", f"out_dir={runs}", name="tp_a_dense"), progress=False)
    config = tmp_path / "tp.yaml"
    config.write_text("name: tp\n")
    out = tmp_path / "policy.json"
    policy = load_benchmark("thread_policy")
    assert policy.main(["--config", str(config), "--runs-dir", str(runs), "--rows", "a_dense:torch:render.n_samples=4",
                        "--policies", "default", "passive", "--repeats", "1", "--view", "0", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [(r["policy"], r["env"]) for r in record["rows"]] == [("default", {}),
                                                                  ("passive", {"OMP_WAIT_POLICY": "PASSIVE"})]
    assert all(r["median_ms"] > 0 and len(r["ms"]) == 1 for r in record["rows"])
    with pytest.raises(SystemExit):
        policy.main(["--config", str(config), "--runs-dir", str(runs), "--rows", "b_missing:torch", "--out", str(out)])
