"""Cross-scene training (training/multiscene.py): targets from several scenes, the evaluation scene never seen."""
import numpy as np
import pytest
import torch

from data.synthetic import make_synthetic_scene
from gnt_shiftadd.config import ConfigError
from gnt_shiftadd.training import multiscene
from gnt_shiftadd.training.trainer import train


@pytest.fixture(scope="module")
def other_scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_scenes")
    return [make_synthetic_scene(root / f"s{seed}", num_views=8, height=36, width=48, factor=4, seed=seed)
            for seed in (1, 2)]


def test_entries_are_checked_and_the_evaluation_scene_is_refused(tiny_config, tiny_scene, other_scenes):
    cfg = tiny_config(f"data.train_scenes=[{other_scenes[0]}, {{scene: {other_scenes[1]}, factor: 4}}]")
    configs = multiscene.training_scene_configs(cfg)
    assert [c.data.scene for c in configs] == [str(other_scenes[0]), str(other_scenes[1])]
    assert all(c.data.llffhold == 0 and c.data.factor == 4 for c in configs)
    with pytest.raises(ConfigError, match=r"train_scenes\[1\].*evaluation scene"):
        multiscene.training_scene_configs(tiny_config(f"data.train_scenes=[{other_scenes[0]}, {tiny_scene}]"))
    with pytest.raises(ConfigError, match=r"train_scenes\[0\]: factor must be a positive integer"):
        multiscene.training_scene_configs(tiny_config(f"data.train_scenes=[{{scene: {other_scenes[0]}, factor: 0}}]"))
    with pytest.raises(ConfigError, match=r"train_scenes\[0\]: expected a folder"):
        multiscene.training_scene_configs(tiny_config(f"data.train_scenes=[{{path: {other_scenes[0]}}}]"))


def test_training_draws_only_from_the_training_scenes_and_resumes_exactly(tiny_config, other_scenes, monkeypatch):
    drawn = []
    original = multiscene.pick_scene

    def spy(scenes, rng):
        picked = original(scenes, rng)
        drawn.append(str(picked.scene.root))
        return picked

    monkeypatch.setattr("gnt_shiftadd.training.trainer.pick_scene", spy)
    extra = f"data.train_scenes=[{other_scenes[0]}, {other_scenes[1]}]"
    full = train(tiny_config(extra, "train.steps=8", name="multi"), progress=False)
    assert set(drawn) == {str(other_scenes[0]), str(other_scenes[1])}  # both, and never the evaluation scene
    first = train(tiny_config(extra, "train.steps=4", name="multi_split"), progress=False)
    second = train(tiny_config(extra, "train.steps=8", name="multi_split"), resume=True, progress=False)
    assert all(second.losses[s] == full.losses[s] for s in range(5, 9))
    assert all(first.losses[s] == full.losses[s] for s in range(1, 5))


def test_single_scene_runs_draw_nothing_extra():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert multiscene.pick_scene(["only"], rng) == "only" and rng.bit_generator.state == state
