"""benchmarks/train_speed.py times the trainer's own step: with train.patch_size and train.perceptual_weight set,
the timed step renders the patch and runs the LPIPS term (an earlier version timed only the random rays and
under-reported the per-scene recipe's step by half)."""
import pytest

from conftest import load_benchmark, tiny_overrides
from gnt_shiftadd.config import load_config
from gnt_shiftadd.evaluation.lpips import LPIPSUnavailable, load_lpips


@pytest.fixture(scope="module")
def train_speed():
    return load_benchmark("train_speed")


def test_timed_step_includes_the_patch_and_its_perceptual_loss(train_speed, tiny_scene, tmp_path, monkeypatch):
    try:
        load_lpips("alex")
    except LPIPSUnavailable as exc:
        pytest.skip(f"LPIPS weights not available: {exc}")
    cfg = load_config(None, tiny_overrides(tiny_scene, tmp_path) + ["train.patch_size=32", "train.perceptual_weight=0.1"])
    seen = []
    real_step = train_speed.training_step

    def recording_step(model, batch, cfg, generator, teacher=None, parts=None, perceptual=None):
        parts = {} if parts is None else parts
        loss = real_step(model, batch, cfg, generator, teacher, parts, perceptual)
        seen.append((batch.patch_size, batch.target_rgb.shape[0], "perceptual" in parts))
        return loss

    monkeypatch.setattr(train_speed, "training_step", recording_step)
    times = train_speed.seconds_per_step(cfg, steps=1, warmup=0)
    assert len(times) == 1 and times[0] > 0
    assert seen == [(32, 32 + 32 * 32, True)]
