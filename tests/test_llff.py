"""The LLFF loader against the facts in ../shared/data/README.md, and every bad-input error."""
import hashlib
import warnings

import numpy as np
import pytest
from PIL import Image

from data.llff import load_llff_scene, read_poses_bounds
from data.scene import SceneError


def test_fern_facts(fern_dir):
    digest = hashlib.sha256((fern_dir / "poses_bounds.npy").read_bytes()).hexdigest()
    assert digest == "d2933dbdbec7791d4e9041570e5aff649bf934e99ee22d04d92044afe7d26270"
    _, hwf, bounds = read_poses_bounds(fern_dir)
    assert hwf[0, 2] == pytest.approx(3260.53, abs=0.01)
    assert bounds.min() == pytest.approx(16.99, abs=0.01) and bounds.max() == pytest.approx(80.00, abs=0.01)

    scene = load_llff_scene(fern_dir, factor=8)
    assert scene.images.shape == (20, 378, 504, 3) and scene.images.dtype == np.float32
    assert 0.0 <= scene.images.min() and scene.images.max() <= 1.0
    assert scene.intrinsics[0, 0, 0] == pytest.approx(407.57, abs=0.01)
    assert scene.intrinsics[0, :2, 2].tolist() == [252.0, 189.0]
    assert scene.test_ids.tolist() == [0, 8, 16] and len(scene.train_ids) == 17
    assert set(scene.train_ids) | set(scene.test_ids) == set(range(20))
    R = scene.c2w[:, :3, :3]
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-5)
    assert np.allclose(np.linalg.det(R), 1.0, atol=1e-5)
    # rescaled so the nearest bound is 1 / 0.75; recentred so the cameras' mean centre is the origin and their
    # mean viewing direction (OpenCV +z) is the world -z axis
    assert scene.bounds.min() == pytest.approx(1 / 0.75, rel=1e-5)
    assert np.allclose(scene.c2w[:, :3, 3].mean(axis=0), 0.0, atol=1e-5)
    forward = scene.c2w[:, :3, 2].mean(axis=0)
    assert forward[2] < -0.99
    near, far = scene.depth_range(0)
    assert near == pytest.approx(0.9 * scene.bounds[0, 0]) and far == pytest.approx(1.6 * scene.bounds[0, 1])


def test_fern_factor_4_is_the_same_views(fern_dir):
    scene4 = load_llff_scene(fern_dir, factor=4, llffhold=0)
    assert scene4.images.shape == (20, 756, 1008, 3)
    assert scene4.intrinsics[0, 0, 0] == pytest.approx(815.13, abs=0.01)
    assert len(scene4.test_ids) == 0 and len(scene4.train_ids) == 20
    scene8 = load_llff_scene(fern_dir, factor=8)
    assert np.allclose(scene4.c2w, scene8.c2w)
    small = scene4.images[5].reshape(378, 2, 504, 2, 3).mean(axis=(1, 3))
    assert np.abs(small - scene8.images[5]).mean() < 0.02


def _tiny_scene(root, n=3, size=(12, 8), mode="RGB", count=None, folder="images_2"):
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    poses = np.zeros((n, 17))
    for i in range(n):
        pose = np.zeros((3, 5))
        pose[:, :3] = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])  # [down, right, back] for a camera looking -z
        pose[:, 3] = [0.1 * i, 0.0, 0.0]
        pose[:, 4] = [size[1] * 2, size[0] * 2, 20.0]
        poses[i, :15] = pose.ravel()
        poses[i, 15:] = [2.0, 8.0]
    np.save(root / "poses_bounds.npy", poses)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    for i in range(n if count is None else count):
        data = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode).save(root / folder / f"image{i:03d}.png")
    return root


def test_tiny_scene_loads_and_resizes_from_full_images(tmp_path):
    scene = load_llff_scene(_tiny_scene(tmp_path / "a"), factor=2)
    assert scene.images.shape == (3, 8, 12, 3)
    assert scene.intrinsics[0, 0, 0] == pytest.approx(10.0)
    resized = load_llff_scene(_tiny_scene(tmp_path / "b", size=(24, 16), folder="images"), factor=2)
    assert resized.images.shape == (3, 8, 12, 3)  # images/ resized by 1/2 in memory
    assert resized.intrinsics[0, 0, 0] == pytest.approx(5.0)  # focal 20 at a full width of 48 -> 5 at width 12


def test_grayscale_is_converted_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="image000.png is grayscale"):
        scene = load_llff_scene(_tiny_scene(tmp_path / "g", mode="L"), factor=2)
    assert scene.images.shape == (3, 8, 12, 3)
    assert np.array_equal(scene.images[0, ..., 0], scene.images[0, ..., 2])


def _write_bad(root, what):
    if what == "missing_folder":
        return root / "nope", "does not exist"
    _tiny_scene(root)
    if what == "missing_poses":
        (root / "poses_bounds.npy").unlink()
        return root, "poses_bounds.npy is missing"
    if what == "garbage_poses":
        (root / "poses_bounds.npy").write_bytes(b"hello")
        return root, "poses_bounds.npy cannot be read"
    if what == "wrong_shape":
        np.save(root / "poses_bounds.npy", np.zeros((3, 15)))
        return root, r"shape \(3, 15\); expected \(N, 17\)"
    if what == "nan_poses":
        poses = np.load(root / "poses_bounds.npy")
        poses[1, 3] = np.nan
        np.save(root / "poses_bounds.npy", poses)
        return root, r"non-finite values .* rows \[1\]"
    if what == "bad_bounds":
        poses = np.load(root / "poses_bounds.npy")
        poses[2, 15] = -1.0
        np.save(root / "poses_bounds.npy", poses)
        return root, "near/far bounds must be positive"
    if what == "count_mismatch":
        (root / "images_2" / "image002.png").unlink()
        return root, "2 images in images_2/ but 3 poses"
    if what == "no_images":
        for p in (root / "images_2").iterdir():
            p.unlink()
        (root / "images_2").rmdir()
        return root, "neither images_2/ nor images/"
    if what == "corrupt_image":
        (root / "images_2" / "image001.png").write_bytes(b"not a png")
        return root, "image001.png cannot be read as an image"
    if what == "rgba":
        Image.fromarray(np.zeros((8, 12, 4), np.uint8), "RGBA").save(root / "images_2" / "image001.png")
        return root, "image001.png is RGBA"
    if what == "size_mismatch":
        Image.fromarray(np.zeros((9, 12, 3), np.uint8)).save(root / "images_2" / "image001.png")
        return root, "images differ in size.*image001.png"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing_folder", "missing_poses", "garbage_poses", "wrong_shape", "nan_poses",
                                  "bad_bounds", "count_mismatch", "no_images", "corrupt_image", "rgba", "size_mismatch"])
def test_bad_scenes_give_clear_errors(tmp_path, what):
    root, message = _write_bad(tmp_path / "scene", what)
    with pytest.raises(SceneError, match=message) as info:
        load_llff_scene(root, factor=2)
    assert str(root) in str(info.value)
