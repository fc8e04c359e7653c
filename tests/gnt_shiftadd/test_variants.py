"""The variant grid (gnt_shiftadd/variants.py): fine-tune, evaluate, count, tabulate; reuse on re-run."""
import json

import pytest

from gnt_shiftadd.training.trainer import train
from gnt_shiftadd.variants import recount_variant_ops, run_variant_grid


def test_grid_records_energy_against_dense_fp32_and_dense_int8_and_reuses_finished_variants(tiny_config, tmp_path):
    teacher = train(tiny_config("train.steps=2", name="grid_teacher"), progress=False).checkpoint
    base = tiny_config(name="grid")
    out = tmp_path / "grid.json"
    record = run_variant_grid(base, teacher, 2, out, only=["a_dense", "j_int8_shift_all"], progress=False)
    dense, integer = record["variants"]["a_dense"], record["variants"]["j_int8_shift_all"]
    fp32_mj = dense["ops"]["per_frame"]["energy_pj"]
    int8_mj = dense["ops_dense_int8"]["per_frame"]["energy_pj"]
    assert int8_mj < fp32_mj  # the same model, its block linears as int8
    assert dense["ops_dense_int8"]["per_ray"]["total"].get("mult_int8", 0) > 0
    assert abs(integer["energy_saving_vs_a_int8"] - (1 - integer["ops"]["per_frame"]["energy_pj"] / int8_mj)) < 1e-12
    assert integer["energy_saving_vs_a"] > integer["energy_saving_vs_a_int8"]
    table = out.with_suffix(".md").read_text()
    assert "saving vs (a) as int8" in table and "(a) as int8:" in table
    nearest = record["baselines"]["nearest"]["mean"]
    assert f"| show the nearest training photo | {nearest['psnr']:.2f} |" in table
    # a re-run reuses both (same steps, checkpoints present) and keeps the record
    stamp = out.stat().st_mtime_ns
    again = run_variant_grid(base, teacher, 2, out, only=["a_dense", "j_int8_shift_all"], progress=False)
    assert again["variants"]["j_int8_shift_all"]["checkpoint"] == integer["checkpoint"]
    assert json.loads(out.read_text())["variants"].keys() == record["variants"].keys()
    assert out.stat().st_mtime_ns >= stamp

    # recounting ops keeps quality and checkpoints, replaces the counts (here: a doctored one comes back right)
    doctored = json.loads(out.read_text())
    doctored["variants"]["j_int8_shift_all"]["ops"]["per_frame"]["energy_pj"] = 1.0
    out.write_text(json.dumps(doctored))
    recounted = recount_variant_ops(base, out)
    j = recounted["variants"]["j_int8_shift_all"]
    assert j["ops"]["per_frame"]["energy_pj"] == integer["ops"]["per_frame"]["energy_pj"]
    assert j["heldout_mean"] == integer["heldout_mean"] and j["checkpoint"] == integer["checkpoint"]
    assert recounted["variants"]["a_dense"]["ops_dense_int8"] == dense["ops_dense_int8"]


def test_recount_names_a_missing_grid_or_checkpoint(tiny_config, tmp_path):
    base = tiny_config(name="grid_missing")
    with pytest.raises(FileNotFoundError, match="no variant grid to recount"):
        recount_variant_ops(base, tmp_path / "none.json")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"extra_steps": 2, "variants": {"a_dense": {
        "config": "configs/shiftadd/a_dense.yaml", "checkpoint": str(tmp_path / "gone.pt")}}}))
    with pytest.raises(FileNotFoundError, match="variant 'a_dense' names checkpoint .*gone.pt"):
        recount_variant_ops(base, grid)
