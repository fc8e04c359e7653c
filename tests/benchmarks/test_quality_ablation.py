"""benchmarks/quality_ablation.py: every run is trained, scored and compared with the trivial baselines of its own
scene (an ablation over several scenes once compared them all with the first scene's baselines)."""
import json
import subprocess
import sys

import yaml

from conftest import REPO_ROOT, tiny_overrides
from data.synthetic import make_synthetic_scene
from gnt_shiftadd.config import load_config


def test_each_run_is_compared_with_its_own_scenes_baselines(tiny_scene, tmp_path):
    other = tmp_path / "other_scene"
    make_synthetic_scene(other, num_views=12, height=36, width=48, factor=4, seed=5)
    base = load_config(None, tiny_overrides(tiny_scene, tmp_path / "runs") + ["train.steps=2", "eval.views=1"])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base.to_dict()))
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(
        {"base": str(tmp_path / "base.yaml"), "runs": {"first": [], "second": [f"data.scene={other}"]}}))
    out = tmp_path / "ablation.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "quality_ablation.py"), "--ablation",
               str(tmp_path / "ablation.yaml"), "--out", str(out)]
    done = subprocess.run(command + ["--only", "first"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    subprocess.run(command + ["--only", "second"], check=True, cwd=REPO_ROOT, capture_output=True)
    record = json.loads(out.read_text())
    first, second = record["runs"]["first"], record["runs"]["second"]
    assert first["scene"] == str(tiny_scene) and second["scene"] == str(other)
    assert len(record["baselines_by_scene"]) == 2  # kept across the two --only calls
    assert first["baselines"]["nearest"] != second["baselines"]["nearest"]
    for run in (first, second):
        nearest = run["baselines"]["nearest"]
        assert run["beats_nearest_view"]["psnr"] == (run["heldout_mean"]["psnr"] > nearest["psnr"])
        assert run["steps"] == 2 and len(run["heldout_per_view"]) == 1
        assert run["training_psnr_last_300_steps"] > 0  # from the run's TensorBoard train/psnr
