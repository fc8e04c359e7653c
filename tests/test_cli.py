import json

import pytest

import run_nerf
from conftest import tiny_overrides


def test_train_eval_render_via_cli(tiny_scene, tmp_path, capsys):
    overrides = tiny_overrides(tiny_scene, tmp_path / "runs", "cli") + ["train.steps=2"]
    assert run_nerf.main(["train", "--quiet", *overrides]) == 0
    ckpt = tmp_path / "runs" / "cli" / "checkpoints" / "latest.pt"
    assert ckpt.exists()
    # eval with only the checkpoint: the run's own config comes from it
    assert run_nerf.main(["eval", "--quiet", "--ckpt", str(ckpt)]) == 0
    metrics = json.loads((tmp_path / "runs" / "cli" / "eval" / "metrics.json").read_text())
    assert len(metrics["per_view"]) == 2 and metrics["mean"]["psnr"] > 0
    assert metrics["mean"]["lpips"] is None  # eval.lpips=false in the tiny config
    assert run_nerf.main(["render", "--quiet", "--ckpt", str(ckpt)]) == 0
    assert (tmp_path / "runs" / "cli" / "video" / "video.mp4").stat().st_size > 0
    assert len(list((tmp_path / "runs" / "cli" / "video" / "frames").glob("*.png"))) == 2


def test_eval_on_tvm_kernels_matches_the_torch_reference(tiny_scene, tmp_path):
    pytest.importorskip("tvm")
    overrides = tiny_overrides(tiny_scene, tmp_path / "runs", "kern") + ["train.steps=2", "model.dropout=0.0"]
    assert run_nerf.main(["train", "--quiet", *overrides]) == 0
    ckpt = tmp_path / "runs" / "kern" / "checkpoints" / "latest.pt"
    metrics_path = tmp_path / "runs" / "kern" / "eval" / "metrics.json"
    psnr = {}
    for backend in ("torch", "tvm"):
        assert run_nerf.main(["eval", "--quiet", "--ckpt", str(ckpt), "--kernels", backend]) == 0
        psnr[backend] = json.loads(metrics_path.read_text())["mean"]["psnr"]
    assert abs(psnr["tvm"] - psnr["torch"]) < 1e-3, psnr
    assert run_nerf.main(["eval", "--quiet", "--ckpt", str(ckpt), "render.kernels=cuda"]) == 2


def test_cli_errors_are_one_clear_line(tiny_scene, tmp_path, capsys):
    assert run_nerf.main(["train", "train.stepz=3"]) == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    missing = tmp_path / "no_such_scene"
    assert run_nerf.main(["train", f"data.scene={missing}", "data.make_synthetic=false", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "nerf_llff_data" in err
    assert run_nerf.main(["eval", "--ckpt", str(tmp_path / "nothing.pt")]) == 2
    assert "nothing.pt does not exist" in capsys.readouterr().err


def test_rendering_commands_quiet_openmp_before_torch_loads(tiny_scene, tmp_path):
    """eval/render/report on the kernels set OMP_WAIT_POLICY=PASSIVE before torch loads (gnt_shiftadd.runtime):
    recorded in the metrics; with --kernels torch, or a policy of the user's, nothing is changed."""
    import os
    import subprocess
    import sys

    overrides = tiny_overrides(tiny_scene, tmp_path / "runs", "omp") + ["train.steps=1"]
    assert run_nerf.main(["train", "--quiet", *overrides]) == 0
    ckpt = tmp_path / "runs" / "omp" / "checkpoints" / "latest.pt"
    metrics_path = tmp_path / "runs" / "omp" / "eval" / "metrics.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    policies = {}
    for name, extra, user_env in (("auto", [], {}), ("torch", ["--kernels", "torch"], {}),
                                  ("user", [], {"GOMP_SPINCOUNT": "1000"})):
        subprocess.run([sys.executable, "run_nerf.py", "eval", "--quiet", "--ckpt", str(ckpt), *extra],
                       env=env | user_env, check=True, capture_output=True, cwd=run_nerf.DEFAULT_CONFIG.parents[1])
        policies[name] = json.loads(metrics_path.read_text())["environment"]["openmp_policy"]
    assert policies == {"auto": {"OMP_WAIT_POLICY": "PASSIVE"}, "torch": {}, "user": {"GOMP_SPINCOUNT": "1000"}}
