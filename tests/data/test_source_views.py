import numpy as np

from data.llff import load_llff_scene
from data.source_views import nearest_views, sample_training_source_views


def _cameras(xs):
    c2w = np.repeat(np.eye(4)[None], len(xs), axis=0)
    c2w[:, 0, 3] = xs
    return c2w


def test_nearest_views_sorted_and_excluding_the_target():
    cams = _cameras([0.0, 1.0, -0.5, 3.0, 0.2])
    assert nearest_views(cams[0], cams, 3, exclude=0).tolist() == [4, 2, 1]
    assert nearest_views(cams[0], cams, 10, exclude=0).tolist() == [4, 2, 1, 3]
    assert nearest_views(cams[0], cams, 2).tolist() == [0, 4]


def test_training_selection_on_fern(fern_dir):
    scene = load_llff_scene(fern_dir, factor=8)
    cams = scene.c2w[scene.train_ids]
    counts = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        picked = sample_training_source_views(rng, cams[4], cams, 10, exclude=4)
        assert 4 not in picked and len(set(picked.tolist())) == len(picked)
        counts.add(len(picked))
        again = sample_training_source_views(np.random.default_rng(seed), cams[4], cams, 10, exclude=4)
        assert np.array_equal(picked, again)
    assert counts <= set(range(8, 12)) and len(counts) >= 3  # 8..11 views, randomized


def test_training_selection_without_real_data():
    """Random cameras: picks come from the nearest min(10 f, 22) views, 8..11 of them, deterministic per seed."""
    cams = np.repeat(np.eye(4)[None], 30, axis=0)
    cams[:, :3, 3] = np.random.default_rng(1).normal(size=(30, 3))
    order = nearest_views(cams[0], cams, 29, exclude=0)
    counts = set()
    for seed in range(40):
        picked = sample_training_source_views(np.random.default_rng(seed), cams[0], cams, 10, exclude=0)
        counts.add(len(picked))
        assert set(picked.tolist()) <= set(order[:22].tolist()) and 0 not in picked
        assert len(set(picked.tolist())) == len(picked)
        np.testing.assert_array_equal(picked, sample_training_source_views(np.random.default_rng(seed), cams[0], cams,
                                                                           10, exclude=0))
    assert counts == {8, 9, 10, 11}
    few = sample_training_source_views(np.random.default_rng(0), cams[0], cams[:4], 10, exclude=0)
    assert sorted(few.tolist()) == [1, 2, 3]  # capped by the pool
