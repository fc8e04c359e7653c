"""run_nerf.py report on the tiny synthetic scene: table, plots and crops from real fine-tuned variants, latency
on both backends, incremental re-runs, and clear errors for bad report settings."""
import json

import imageio.v3 as iio
import pytest

import run_nerf
from conftest import tiny_overrides
from gnt_shiftadd.config import ConfigError, load_config
from gnt_shiftadd.evaluation.timing import frame_latency as real_frame_latency
from gnt_shiftadd.report import best_psnr_per_ms, pareto_front, run_report

VARIANTS = "[a_dense,c_hash_shift_linears,f_moe_unweighted]"


def _report_overrides(tiny_scene, tmp_path):
    return tiny_overrides(tiny_scene, tmp_path / "unused", "rep") + [
        "model.dropout=0.0", "train.steps=4", "train.val_every=0", f"report.variants={VARIANTS}",
        "report.finetune_steps=2", "report.latency_repeats=1", "report.crop=8"]


def test_report_end_to_end_and_incremental_rerun(tiny_scene, tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    from gnt_shiftadd.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as the CLI does, so the CLI re-run below sees the same allocator setting
    out = tmp_path / "report"
    def config(*extra):  # what the CLI builds (configs/default.yaml + overrides), so the CLI re-run below matches
        return load_config(run_nerf.DEFAULT_CONFIG, _report_overrides(tiny_scene, tmp_path) + list(extra))

    cfg = config()
    record = run_report(cfg, out, progress=False)

    assert [r["variant"] for r in record["rows"]] == ["a_dense", "c_hash_shift_linears", "f_moe_unweighted"]
    for row in record["rows"]:
        assert row["ms_torch"] > 0 and row["ms_tvm"] > 0
        assert row["ms_per_frame"] == min(row["ms_torch"], row["ms_tvm"])
        # the kernels render the same picture as the reference
        assert abs(row["frame_psnr"]["tvm"] - row["frame_psnr"]["torch"]) < 0.05, row
        assert 5 < row["psnr"] < 60 and row["energy_mj"] > 0
    energy = {r["variant"]: r["energy_mj"] for r in record["rows"]}
    assert energy["c_hash_shift_linears"] < energy["a_dense"]  # shift layers replace multiplications
    assert record["best_psnr_per_ms"] in energy
    assert set(record["pareto_latency"]) <= set(energy) and record["pareto_latency"]
    assert (tmp_path / "report" / "runs" / "rep_teacher" / "checkpoints" / "latest.pt").exists()

    for name in ("psnr_vs_latency.png", "psnr_vs_energy.png", "crops.png"):
        image = iio.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
    markdown = (out / "report.md").read_text()
    assert "Best PSNR per millisecond" in markdown and record["environment"]["device"] in markdown
    assert json.loads((out / "report.json").read_text())["rows"] == record["rows"]

    # a re-run (through the CLI) reuses every finished part: nothing is trained or timed again
    def refuse(*args, **kwargs):
        raise AssertionError("a finished part was recomputed")

    monkeypatch.setattr("gnt_shiftadd.training.trainer.train", refuse)
    monkeypatch.setattr("gnt_shiftadd.variants.run_finetune", refuse)
    monkeypatch.setattr("gnt_shiftadd.report.frame_latency", refuse)
    args = ["report", "--quiet", "--out", str(out), *_report_overrides(tiny_scene, tmp_path)]
    assert run_nerf.main(args) == 0
    again = json.loads((out / "report.json").read_text())
    assert [r["ms_per_frame"] for r in again["rows"]] == [r["ms_per_frame"] for r in record["rows"]]

    # a lost render is re-made (with its timing) for that variant only
    (out / "renders" / "c_hash_shift_linears_tvm.png").unlink()
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return real_frame_latency(*args, **kwargs)

    monkeypatch.setattr("gnt_shiftadd.report.frame_latency", counting)
    run_report(cfg, out, progress=False)
    assert len(calls) == 2 and (out / "renders" / "c_hash_shift_linears_tvm.png").exists()
    calls.clear()
    run_report(config("report.remeasure=true"), out, progress=False)
    assert len(calls) == 6  # every variant on both backends


def test_bad_report_settings_are_clear_errors(tiny_scene, tmp_path, capsys):
    base = _report_overrides(tiny_scene, tmp_path)
    with pytest.raises(ConfigError, match="z_nope"):
        run_report(load_config(None, base + ["report.variants=[a_dense,z_nope]"]), tmp_path / "r1", progress=False)
    with pytest.raises(ConfigError, match="report.view=7"):
        run_report(load_config(None, base + ["report.view=7"]), tmp_path / "r2", progress=False)
    # a report folder made for one scene refuses another (its runs would be mixed up)
    grid = tmp_path / "r4" / "grid.json"
    grid.parent.mkdir()
    grid.write_text(json.dumps({"base_config": {"data": {"scene": "/elsewhere/fern"}}, "variants": {}}))
    with pytest.raises(ConfigError, match="scene='/elsewhere/fern'"):
        run_report(load_config(None, base), tmp_path / "r4", progress=False)
    missing = tmp_path / "nothing.pt"
    assert run_nerf.main(["report", "--out", str(tmp_path / "r3"), "--teacher", str(missing), *base]) == 2
    assert str(missing) in capsys.readouterr().err


def test_pareto_front_and_best_psnr_per_ms():
    points = {"slow_good": (100.0, 25.0), "fast_ok": (10.0, 24.0), "dominated": (50.0, 23.0), "fast_bad": (5.0, 20.0)}
    assert pareto_front(points) == ["fast_bad", "fast_ok", "slow_good"]
    rows = [{"variant": n, "ms_per_frame": c, "psnr": q} for n, (c, q) in points.items()]
    assert best_psnr_per_ms(rows)["variant"] == "fast_bad"
