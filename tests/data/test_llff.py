"""The LLFF loader against the facts in ../shared/data/README.md, and every bad-input error."""
import hashlib
import warnings

import numpy as np
import pytest
from PIL import Image

from data.llff import average_pose, load_llff_scene, read_poses_bounds
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
    opengl = scene.c2w.astype(np.float64) @ np.diag([1.0, -1.0, -1.0, 1.0])
    np.testing.assert_allclose(average_pose(opengl), np.eye(4), atol=1e-5)  # recentred: average pose = identity
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scene = load_llff_scene(_tiny_scene(tmp_path / "g", mode="L"), factor=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert [f"image00{i}.png is grayscale" in m for i, m in enumerate(messages)] == [True] * 3  # one per file
    assert scene.images.shape == (3, 8, 12, 3)
    assert np.array_equal(scene.images[0, ..., 0], scene.images[0, ..., 2])


def test_sixteen_bit_and_palette_images(tmp_path):
    root = _tiny_scene(tmp_path / "s")
    gray16 = np.full((8, 12), 40000, np.uint16)
    gray16[0, 0] = 65535
    Image.fromarray(gray16).save(root / "images_2" / "image000.png")  # 16-bit grayscale PNG
    palette = Image.fromarray(np.full((8, 12, 3), [200, 40, 10], np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(root / "images_2" / "image001.png")
    with pytest.warns(UserWarning, match="image000.png is grayscale"):
        scene = load_llff_scene(root, factor=2)
    assert scene.images[0, 1, 1].tolist() == pytest.approx([40000 / 65535] * 3, abs=1e-6)
    assert scene.images[0, 0, 0].tolist() == pytest.approx([1.0] * 3)
    assert scene.images[1, 3, 3].tolist() == pytest.approx([200 / 255, 40 / 255, 10 / 255], abs=1e-6)
    # the same 16-bit image through the resize path (images/ at twice the size, factor 2) keeps its precision
    full = _tiny_scene(tmp_path / "f", size=(24, 16), folder="images")
    Image.fromarray(np.full((16, 24), 40000, np.uint16)).save(full / "images" / "image000.png")
    with pytest.warns(UserWarning, match="grayscale"):
        resized = load_llff_scene(full, factor=2)
    assert resized.images.shape == (3, 8, 12, 3)
    assert resized.images[0].min() == pytest.approx(40000 / 65535, abs=1e-5)


def test_factor_1_reads_images_folder(tmp_path):
    scene = load_llff_scene(_tiny_scene(tmp_path / "one", size=(24, 16), folder="images"), factor=1)
    assert scene.images.shape == (3, 16, 24, 3) and scene.intrinsics[0, 0, 0] == pytest.approx(10.0)
    assert scene.name == "one" and scene.image_paths[0].endswith("images/image000.png")


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
        return root, r"image001.png is RGBA \(4 channels\): flatten the alpha or convert to RGB"
    if what == "bad_hwf":
        poses = np.load(root / "poses_bounds.npy")
        poses[0, 9] = 0.0  # W of view 0
        np.save(root / "poses_bounds.npy", poses)
        return root, r"\[H, W, focal\] column must be positive"
    if what == "text_poses":
        np.save(root / "poses_bounds.npy", np.full((3, 17), "x"))
        return root, "poses_bounds.npy holds <U1 values"
    if what == "empty_folder":
        for p in (root / "images_2").iterdir():
            p.unlink()
        return root, "images_2 contains no .png/.jpg/.jpeg images"
    if what == "truncated_image":
        data = (root / "images_2" / "image002.png").read_bytes()
        (root / "images_2" / "image002.png").write_bytes(data[: len(data) // 2])
        return root, "image002.png cannot be read as an image"
    if what == "corrupt_full_image":  # images/ (resize path): the first image's header is already checked
        (root / "images_2").rename(root / "images")
        (root / "images" / "image000.png").write_bytes(b"not a png")
        return root, "image000.png cannot be read as an image"
    if what == "size_mismatch_full":  # images/ (resize path): sizes are compared before resizing
        (root / "images_2").rename(root / "images")
        Image.fromarray(np.zeros((9, 12, 3), np.uint8)).save(root / "images" / "image002.png")
        return root, "images differ in size.*image002.png is 12x9"
    if what == "size_mismatch":
        Image.fromarray(np.zeros((9, 12, 3), np.uint8)).save(root / "images_2" / "image001.png")
        return root, "images differ in size.*image001.png"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing_folder", "missing_poses", "garbage_poses", "wrong_shape", "nan_poses",
                                  "bad_bounds", "bad_hwf", "text_poses", "count_mismatch", "no_images",
                                  "empty_folder", "corrupt_image", "truncated_image", "corrupt_full_image", "rgba",
                                  "size_mismatch", "size_mismatch_full"])
def test_bad_scenes_give_clear_errors(tmp_path, what):
    root, message = _write_bad(tmp_path / "scene", what)
    with pytest.raises(SceneError, match=message) as info:
        load_llff_scene(root, factor=2)
    assert str(root) in str(info.value)
