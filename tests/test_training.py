import pytest
import torch

from gnt_shiftadd.training import trainer
from gnt_shiftadd.training.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from gnt_shiftadd.training.trainer import TrainingError, train


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_equals_uninterrupted_run(tiny_config):
    """Stopping after 3 steps and resuming gives bit-identical losses and weights to one 6-step run."""
    full = train(tiny_config(name="full"), progress=False)
    first = train(tiny_config("train.steps=3", name="split"), progress=False)
    assert read_checkpoint(first.checkpoint)["step"] == 3
    second = train(tiny_config(name="split"), resume=True, progress=False)
    assert sorted(second.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second.losses[step] == full.losses[step], step
    for step in (1, 2, 3):
        assert first.losses[step] == full.losses[step]
    a, b = _weights(full.model), _weights(second.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_comes_from_checkpoint_contents_not_file_name(tiny_config, tmp_path):
    run = train(tiny_config("train.steps=3", name="named"), progress=False)
    renamed = tmp_path / "step_999999.pt"
    renamed.write_bytes(run.checkpoint.read_bytes())
    cfg = tiny_config(name="named")
    model = trainer.build_model(cfg, torch.device("cpu"))
    assert load_checkpoint(renamed, cfg, model) == 3


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(tiny_config):
    train(tiny_config("train.steps=2", name="once"), progress=False)
    with pytest.raises(CheckpointError, match="already holds a run at step 2.*--resume"):
        train(tiny_config(name="once"), progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_config(name="never_trained"), resume=True, progress=False)


def test_resuming_a_run_that_started_from_another_init_is_refused(tiny_config):
    """A run folder reused for a different train.init_from must not silently continue the old run."""
    teacher_a = train(tiny_config("train.steps=1", name="teacher_a"), progress=False).checkpoint
    teacher_b = train(tiny_config("train.steps=1", name="teacher_b"), progress=False).checkpoint
    tuned = train(tiny_config("train.steps=1", f"train.init_from={teacher_a}", name="tuned"), progress=False)
    before = tuned.checkpoint.read_bytes()
    with pytest.raises(CheckpointError, match=r"(?s)started from train.init_from=.*teacher_a.*asks for.*teacher_b"):
        train(tiny_config("train.steps=2", f"train.init_from={teacher_b}", name="tuned"), resume="auto", progress=False)
    assert tuned.checkpoint.read_bytes() == before
    # the same start (however the path is spelled) resumes
    again = train(tiny_config("train.steps=2", f"train.init_from={teacher_a.parent}/../checkpoints/{teacher_a.name}",
                              name="tuned"), resume="auto", progress=False)
    assert read_checkpoint(again.checkpoint)["step"] == 2


def test_checkpoint_from_another_model_configuration_is_refused(tiny_config):
    run = train(tiny_config("train.steps=1", name="small"), progress=False)
    other = tiny_config("model.netwidth=32", name="small")
    model = trainer.build_model(other, torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"(?s)different model configuration.*model.netwidth: checkpoint has 16, config has 32"):
        load_checkpoint(run.checkpoint, other, model)


def test_unreadable_or_foreign_checkpoints_are_clear_errors(tiny_config, tmp_path):
    cfg = tiny_config()
    model = trainer.build_model(cfg, torch.device("cpu"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt cannot be read"):
        load_checkpoint(junk, cfg, model)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt is not a ShiftAdd-GNT checkpoint"):
        load_checkpoint(foreign, cfg, model)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tiny_config, monkeypatch):
    real_step = trainer.training_step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(trainer, "training_step", flaky)
    cfg = tiny_config(name="nan")
    with pytest.raises(TrainingError, match="loss is nan at step 5.*latest.pt"):
        train(cfg, progress=False)
    assert read_checkpoint(trainer.checkpoint_path(cfg))["step"] == 3


def test_tensorboard_logs_are_written(tiny_config):
    cfg = tiny_config("train.steps=3", name="tb")
    train(cfg, progress=False)
    files = list((cfg.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cfg.run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"train/loss", "train/psnr", "lr/transformer", "lr/cnn", "val/psnr"} <= set(acc.Tags()["scalars"])
    assert "val/render" in acc.Tags()["images"]


def test_patch_rays_form_one_patch_and_patchless_batches_are_unchanged(tiny_config):
    import numpy as np

    from gnt_shiftadd.experiment import SceneTensors, load_scene
    from gnt_shiftadd.training.batch import sample_training_batch, step_rng

    cfg = tiny_config()
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    plain = sample_training_batch(tensors, step_rng(0, 5), 16, 3)
    with_patch = sample_training_batch(tensors, step_rng(0, 5), 16, 3, patch_size=4)
    assert torch.equal(with_patch.target_rgb[:16], plain.target_rgb)  # same random rays first
    patch = with_patch.target_rgb[16:].reshape(4, 4, 3)
    image = tensors.images[with_patch.target_id]
    hits = [(r, c) for r in range(image.shape[0] - 3) for c in range(image.shape[1] - 3)
            if torch.equal(image[r:r + 4, c:c + 4], patch)]
    assert hits, "the last 16 rays are not a 4x4 patch of the target"
    with pytest.raises(ValueError, match="patch_size 99 is larger than the images"):
        sample_training_batch(tensors, step_rng(0, 5), 16, 3, patch_size=99)
    assert np.array_equal(with_patch.source_ids, plain.source_ids)


def test_perceptual_patch_loss_is_logged_and_needs_a_large_enough_patch(tiny_config, tmp_path):
    from gnt_shiftadd.config import ConfigError
    from gnt_shiftadd.evaluation.lpips import LPIPSUnavailable, load_lpips

    with pytest.raises(ConfigError, match="patch_size >= 32"):
        tiny_config("train.perceptual_weight=0.1", "train.patch_size=8")
    try:
        load_lpips("alex")
    except LPIPSUnavailable as exc:
        pytest.skip(f"LPIPS weights not available: {exc}")
    run = train(tiny_config("train.perceptual_weight=0.1", "train.patch_size=32", "train.steps=2", name="lp"),
                progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in run.losses.values())


def test_compiled_training_step_matches_eager_and_keeps_checkpoint_keys(tiny_config):
    """train.compile=true compiles the transformer in place: same state_dict keys (checkpoints interchangeable with
    eager runs) and the same first-step loss up to the compiler's float reassociation."""
    no_dropout = ("train.steps=1", "model.dropout=0")  # compiled dropout draws its own random numbers
    eager = train(tiny_config(*no_dropout, name="eager"), progress=False)
    compiled = train(tiny_config(*no_dropout, "train.compile=true", name="compiled"), progress=False)
    assert compiled.model.transformer._compiled_call_impl is not None
    assert eager.model.transformer._compiled_call_impl is None
    assert read_checkpoint(compiled.checkpoint)["model"].keys() == read_checkpoint(eager.checkpoint)["model"].keys()
    assert compiled.losses[1] == pytest.approx(eager.losses[1], rel=1e-4)
