"""Held-out evaluation: eval.views scores an evenly spaced subset of the held-out views, and the trivial baselines
are always scored on exactly the views the model is scored on."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gnt_shiftadd.config import ConfigError
from gnt_shiftadd.evaluation.baselines import trivial_baselines
from gnt_shiftadd.evaluation.evaluate import evaluate, heldout_views
from gnt_shiftadd.evaluation.metrics import ImageMetrics
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene


def test_heldout_views_keeps_all_or_an_even_subset_with_both_ends():
    scene = SimpleNamespace(test_ids=np.arange(0, 200, 8))  # 25 views, like the shipped chair test split
    assert heldout_views(scene) == list(range(0, 200, 8))
    assert heldout_views(scene, 5) == [0, 48, 96, 144, 192]
    assert heldout_views(scene, 1) == [0]
    assert heldout_views(scene, 99) == list(range(0, 200, 8))
    with pytest.raises(ValueError, match="eval.views must be >= 0"):
        heldout_views(scene, -1)


def test_negative_eval_views_is_refused_by_the_config(tiny_config):
    with pytest.raises(ConfigError, match="eval.views must be >= 0"):
        tiny_config("eval.views=-2")


def test_model_and_baselines_are_scored_on_the_same_subset(tiny_config, tmp_path):
    cfg = tiny_config("eval.views=1", "data.llffhold=4")
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    assert len(tensors.scene.test_ids) == 3
    model = build_model(cfg, torch.device("cpu"))
    result = evaluate(model, tensors, cfg, tmp_path / "eval", progress=False)
    first = int(tensors.scene.test_ids[0])
    assert result["views"] == [first] and result["heldout_views_total"] == 3
    assert [r["view"] for r in result["per_view"]] == [first]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["views"] == [first]
    no_lpips = ImageMetrics(use_lpips=False)  # the tiny images are smaller than LPIPS' receptive field
    baselines = trivial_baselines(tensors, stride=cfg.eval.stride, metrics=no_lpips, max_views=cfg.eval.views)
    assert [r["view"] for r in baselines["nearest"]["per_view"]] == [first]
    everything = trivial_baselines(tensors, stride=cfg.eval.stride, metrics=no_lpips)
    assert [r["view"] for r in everything["mean_image"]["per_view"]] == [int(v) for v in tensors.scene.test_ids]
