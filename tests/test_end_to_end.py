"""Train briefly on the real fern at low resolution on CPU; held-out PSNR must clearly beat showing the
nearest source view (what a model that learned nothing about geometry could do)."""
import pytest

from gnt_shiftadd.config import load_config
from gnt_shiftadd.workflows import run_all

pytestmark = pytest.mark.slow


def test_fern_train_render_eval_beats_nearest_view(fern_dir, tmp_path):
    cfg = load_config(None, [
        "name=fern_e2e", f"out_dir={tmp_path}", f"data.scene={fern_dir}", "data.factor=8", "data.num_source_views=5",
        "model.netwidth=32", "model.trans_depth=2", "model.resnet_layers=[1,1,1]", "model.resnet_base_channels=16",
        "model.feature_channels=16", "render.n_samples=16", "render.chunk_rays=4096", "train.n_rand=512",
        "train.steps=300", "train.val_every=0",
        "train.ckpt_every=200", "eval.stride=4", "eval.lpips=false", "video.frames=2", "video.stride=8",
    ])
    summary = run_all(cfg, progress=False)
    mean = summary["eval"]
    print("fern e2e:", mean)
    assert mean["psnr"] > mean["nearest_view_psnr"] + 1.5
    assert (tmp_path / "fern_e2e" / "video" / "video.mp4").exists()
