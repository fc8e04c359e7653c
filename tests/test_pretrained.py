"""Shipped pretrained models (gnt_shiftadd/pretrained): export, sha256-checked resolution, and the CLI's use of them."""
import json

import pytest
import torch

from gnt_shiftadd import pretrained
from gnt_shiftadd.training.checkpoint import CheckpointError, read_checkpoint
from gnt_shiftadd.training.trainer import train


@pytest.fixture
def exported(tiny_config, tmp_path):
    run = train(tiny_config("train.steps=2", name="to_ship"), progress=False)
    folder = tmp_path / "shipped"
    out = pretrained.export_pretrained(run.checkpoint, "tiny_v1", {"trained_on": ["synthetic"], "command": "test"}, folder)
    return run, folder, out


def test_export_keeps_weights_and_config_and_drops_optimizer(exported):
    run, folder, out = exported
    slim, full = read_checkpoint(out), read_checkpoint(run.checkpoint)
    assert slim["optimizer"] is None and slim["config"] == full["config"] and slim["step"] == 2
    assert all(torch.equal(slim["model"][k], full["model"][k]) for k in full["model"])
    record = json.loads((folder / "tiny_v1.json").read_text())
    assert record["sha256"] == pretrained.sha256_of(out) and record["trained_on"] == ["synthetic"]
    assert out.stat().st_size < run.checkpoint.stat().st_size


def test_resolve_by_alias_name_or_path_and_refuse_a_damaged_file(exported, monkeypatch, tmp_path):
    _, folder, out = exported
    monkeypatch.setattr(pretrained, "DEFAULT_NAME", "tiny_v1")
    assert pretrained.resolve_checkpoint("pretrained", folder) == out
    assert pretrained.resolve_checkpoint("tiny_v1", folder) == out
    assert pretrained.resolve_checkpoint(str(tmp_path / "x.pt"), folder) == tmp_path / "x.pt"  # plain paths pass
    out.write_bytes(out.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        pretrained.resolve_checkpoint("pretrained", folder)
    monkeypatch.setattr(pretrained, "DEFAULT_NAME", "missing_v9")
    with pytest.raises(CheckpointError, match="missing from this installation.*tiny_v1"):
        pretrained.resolve_checkpoint("pretrained", folder)


def test_shipped_default_model_is_present_and_intact():
    """The model `pretrained` names ships with the project and matches its record."""
    path = pretrained.resolve_checkpoint("pretrained")
    record = pretrained.record_of(pretrained.DEFAULT_NAME)
    assert "fern" not in " ".join(record["trained_on"])  # fern is the unseen evaluation scene
    assert read_checkpoint(path)["step"] == record["step"]


def test_cli_renders_unseen_fern_zero_shot_with_the_shipped_model(fern_dir, tmp_path):
    """`eval --ckpt pretrained --scene fern`: no training; the renders beat showing the nearest training photo
    (PSNR and SSIM at 1/8 of images_8 here; the full-resolution figures are in results/)."""
    import run_nerf

    assert run_nerf.main(["eval", "--quiet", "--ckpt", "pretrained", "--scene", str(fern_dir), f"out_dir={tmp_path}",
                          "eval.stride=8", "eval.lpips=false", "eval.save_images=false", "render.kernels=torch"]) == 0
    runs = list(tmp_path.glob("*_fern/eval/metrics.json"))
    assert len(runs) == 1, runs
    metrics = json.loads(runs[0].read_text())["mean"]
    assert metrics["psnr"] > metrics["nearest_view_psnr"] + 3.0, metrics


def test_cli_train_init_pretrained_takes_its_model_section(tiny_scene, tmp_path):
    import run_nerf
    from conftest import tiny_overrides

    overrides = [o for o in tiny_overrides(tiny_scene, tmp_path / "runs", "ft") if not o.startswith("model.")]
    assert run_nerf.main(["train", "--quiet", "--init", "pretrained", *overrides, "train.steps=1"]) == 0
    shipped = read_checkpoint(pretrained.resolve_checkpoint("pretrained"))
    tuned = read_checkpoint(tmp_path / "runs" / "ft" / "checkpoints" / "latest.pt")
    assert tuned["config"]["model"] == shipped["config"]["model"]
    assert tuned["config"]["train"]["init_from"].endswith(f"{pretrained.DEFAULT_NAME}.pt")


def test_shiftadd_variants_convert_from_the_shipped_model(tiny_scene, tmp_path):
    """`finetune --from pretrained` with a ShiftAdd variant: converted in stages and fine-tuned on a new scene."""
    import run_nerf
    from conftest import tiny_overrides

    overrides = [o for o in tiny_overrides(tiny_scene, tmp_path / "runs", "c") if not o.startswith("model.")]
    assert run_nerf.main(["finetune", "--quiet", "--from", "pretrained", "--config", "configs/shiftadd/c_hash_shift_linears.yaml",
                          *overrides, "train.steps=2", "train.calibration_rays=32"]) == 0
    stage2 = sorted((tmp_path / "runs").glob("c*/checkpoints/latest.pt"))
    assert stage2, list((tmp_path / "runs").iterdir())
    tuned = read_checkpoint(stage2[-1])
    assert tuned["config"]["shiftadd"]["attention_linears"] == "shift"
    assert tuned["config"]["model"]["color_head"] == "blend"
