"""Quality right after conversion (before fine-tuning): a dense "conversion" is the teacher itself, and the
converted variants are evaluated as they are."""
import pytest

from gnt_shiftadd.training.trainer import train
from gnt_shiftadd.variants import conversion_quality
from gnt_shiftadd.workflows import run_eval


def test_conversion_quality_of_dense_is_the_teacher(tiny_config, tmp_path):
    cfg = tiny_config("model.dropout=0.0", "train.steps=3", "train.val_every=0")
    teacher = train(cfg, progress=False).checkpoint
    expected = run_eval(cfg, teacher, progress=False)["mean"]["psnr"]
    results = conversion_quality(cfg, teacher, tmp_path / "conv", only=["a_dense", "c_hash_shift_linears"],
                                 progress=False)
    assert set(results) == {"a_dense", "c_hash_shift_linears"}
    assert results["a_dense"]["psnr"] == pytest.approx(expected, abs=1e-6)
    assert 0 < results["c_hash_shift_linears"]["psnr"] < 60
    assert (tmp_path / "conv" / "c_hash_shift_linears" / "metrics.json").exists()
