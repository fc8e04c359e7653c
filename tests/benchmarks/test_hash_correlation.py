"""benchmarks/hash_correlation.py: the correlation metric itself, the synthetic comparison (fitted codes beat random
hyperplanes), and the trained-model path on a tiny GNT (per ray layer, fit and held-out rays counted, a hashed
checkpoint refused)."""
import json

import pytest
import torch

from conftest import load_benchmark
from gnt_shiftadd.training.trainer import train


@pytest.fixture(scope="module")
def hash_corr():
    return load_benchmark("hash_correlation")


def test_mean_row_correlation_is_one_for_affine_copies_and_minus_one_for_negations(hash_corr):
    real = torch.randn(3, 2, 5, 7)
    assert hash_corr.mean_row_correlation(2 * real + 1, real) == pytest.approx(1.0, abs=1e-6)
    assert hash_corr.mean_row_correlation(-real, real) == pytest.approx(-1.0, abs=1e-6)


def test_synthetic_fitted_codes_track_similarity_better_than_random_ones(hash_corr, tmp_path):
    out = tmp_path / "hc.json"
    assert hash_corr.main(["--out", str(out), "--random-seeds", "4"]) == 0
    record = json.loads(out.read_text())
    scores = record["synthetic"]
    assert scores["random_min"] <= scores["random"] <= scores["random_max"]
    assert scores["fitted"] > scores["random"] + 0.05 and scores["fitted"] > 0.7
    assert "trained" not in record


def test_trained_model_scores_every_ray_layer_on_heldout_rays(hash_corr, tiny_config):
    cfg = tiny_config("model.dropout=0.0", "train.steps=2", "train.val_every=0", "train.calibration_rays=16")
    ckpt = train(cfg, progress=False).checkpoint
    overrides = [f"data.scene={cfg.data.scene}", "train.calibration_rays=16"]
    result = hash_corr.trained_model(str(ckpt), None, overrides, n_bits=16, random_seeds=2, rays_per_view=8)
    assert set(result["layers"]) == {f"transformer.ray_blocks.{i}.attn" for i in range(cfg.model.trans_depth)}
    held_out = len(result["heldout_views"])
    for scores in result["layers"].values():
        assert scores["fit_rays"] == 16 and scores["eval_rays"] == 8 * held_out
        assert all(-1.0 <= scores[k] <= 1.0 for k in ("random", "pca_itq", "fitted"))
    assert result["checkpoint_step"] == 2


def test_a_hashed_checkpoint_is_refused(hash_corr, tiny_config, tmp_path):
    from gnt_shiftadd.training.checkpoint import save_checkpoint
    from gnt_shiftadd.experiment import build_model

    cfg = tiny_config("shiftadd.ray_attention=hash_quadratic")
    ckpt = save_checkpoint(tmp_path / "hashed.pt", cfg, build_model(cfg, torch.device("cpu")))
    with pytest.raises(ValueError, match="already hashed"):
        hash_corr.trained_model(str(ckpt), None, [], n_bits=16, random_seeds=1, rays_per_view=4)
