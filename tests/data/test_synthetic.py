"""The procedural LLFF scene: file layout, determinism, and multi-view consistency of images, depths and poses."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.synthetic import make_synthetic_scene

VIEWS, HEIGHT, WIDTH, FACTOR = 20, 72, 96, 4


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    return make_synthetic_scene(tmp_path_factory.mktemp("synthetic") / "scene", num_views=VIEWS, height=HEIGHT,
                                width=WIDTH, factor=FACTOR, seed=0)


def read_rgb(root: Path, index: int) -> np.ndarray:
    """-> float [H, W, 3] in [0, 1]."""
    return np.asarray(Image.open(root / f"images_{FACTOR}" / f"image{index:03d}.png"), dtype=np.float64) / 255.0


def read_depth(root: Path, index: int) -> np.ndarray:
    return np.load(root / f"depth_{FACTOR}" / f"image{index:03d}.npy").astype(np.float64)


def cameras_from_poses_bounds(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Independent reading of poses_bounds.npy -> (OpenCV c2w [N, 4, 4], K [3, 3] at the stored image size)."""
    rows = np.load(root / "poses_bounds.npy")
    mat = rows[:, :15].reshape(-1, 3, 5)
    c2w = np.tile(np.eye(4), (len(rows), 1, 1))
    c2w[:, :3, 0] = mat[:, :, 1]  # right
    c2w[:, :3, 1] = mat[:, :, 0]  # down
    c2w[:, :3, 2] = -mat[:, :, 2]  # forward = -back
    c2w[:, :3, 3] = mat[:, :, 3]
    height, width, focal = mat[0, :, 4] / FACTOR
    K = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])
    return c2w, K


def bilinear(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample image [H, W, C] at pixel coordinates (u = column, v = row), pixel centres at integers."""
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = (u - u0)[:, None], (v - v0)[:, None]
    u1, v1 = np.minimum(u0 + 1, image.shape[1] - 1), np.minimum(v0 + 1, image.shape[0] - 1)
    top = image[v0, u0] * (1 - fu) + image[v0, u1] * fu
    bottom = image[v1, u0] * (1 - fu) + image[v1, u1] * fu
    return top * (1 - fv) + bottom * fv


def reprojection_error(rgb_a, depth_a, K_a, c2w_a, rgb_b, depth_b, K_b, c2w_b, stride: int = 2):
    """Back-project a pixel grid of view a with its depth, project into view b, keep non-occluded points
    (depth agrees with b's depth map), and return (mean abs colour difference, number of points kept)."""
    height, width = depth_a.shape
    v, u = np.mgrid[2 : height - 2 : stride, 2 : width - 2 : stride].reshape(2, -1).astype(np.float64)
    z = depth_a[v.astype(int), u.astype(int)]
    cam_a = (np.stack([u, v, np.ones_like(u)], 1) @ np.linalg.inv(K_a).T) * z[:, None]
    world = cam_a @ c2w_a[:3, :3].T + c2w_a[:3, 3]
    cam_b = (world - c2w_b[:3, 3]) @ c2w_b[:3, :3]  # R^T (x - t)
    pix_b = cam_b @ K_b.T
    ub, vb = pix_b[:, 0] / pix_b[:, 2], pix_b[:, 1] / pix_b[:, 2]
    inside = (ub >= 1) & (ub <= width - 2) & (vb >= 1) & (vb <= height - 2)
    ub, vb, zb = ub[inside], vb[inside], cam_b[inside, 2]
    visible = np.abs(depth_b[np.round(vb).astype(int), np.round(ub).astype(int)] - zb) < 0.01 * zb
    colour_a = rgb_a[v.astype(int), u.astype(int)][inside][visible]
    colour_b = bilinear(rgb_b, ub[visible], vb[visible])
    return float(np.abs(colour_a - colour_b).mean()), int(visible.sum())


def test_files_and_shapes(scene_dir):
    rows = np.load(scene_dir / "poses_bounds.npy")
    assert rows.shape == (VIEWS, 17) and rows.dtype == np.float64
    hwf = rows[:, :15].reshape(-1, 3, 5)[:, :, 4]
    np.testing.assert_allclose(hwf[:, :2], np.tile([FACTOR * HEIGHT, FACTOR * WIDTH], (VIEWS, 1)))
    assert 0.8 * FACTOR * WIDTH < hwf[0, 2] < 1.2 * FACTOR * WIDTH  # ~50-60 degree horizontal FOV
    images = sorted((scene_dir / f"images_{FACTOR}").glob("*.png"))
    depths = sorted((scene_dir / f"depth_{FACTOR}").glob("*.npy"))
    assert len(images) == len(depths) == VIEWS
    with Image.open(images[0]) as image:
        assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
    depth = np.load(depths[0])
    assert depth.shape == (HEIGHT, WIDTH) and depth.dtype == np.float32
    assert (scene_dir / "README.txt").read_text().strip()
    # near/far bracket the true depth of every view, and the scene has parallax (foreground and background)
    for index in range(VIEWS):
        depth = read_depth(scene_dir, index)
        near, far = rows[index, 15:]
        assert near < depth.min() and depth.max() < far
        assert depth.min() < 4.0 and depth.max() > 9.0


def test_rotations_orthonormal_and_views_differ(scene_dir):
    c2w, _ = cameras_from_poses_bounds(scene_dir)
    for R in c2w[:, :3, :3]:
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-9)
        assert np.linalg.det(R) == pytest.approx(1.0)
    spread = np.ptp(c2w[:, :3, 3], axis=0)
    assert 0.3 < spread[0] < 0.8 and spread[1] > 0.15
    assert not np.array_equal(read_rgb(scene_dir, 0), read_rgb(scene_dir, 1))


def test_deterministic_given_seed(tmp_path):
    small = dict(num_views=3, height=HEIGHT, width=WIDTH, factor=FACTOR)
    first = make_synthetic_scene(tmp_path / "first", seed=0, **small)
    again = make_synthetic_scene(tmp_path / "again", seed=0, **small)
    other = make_synthetic_scene(tmp_path / "other", seed=1, **small)
    for index in range(3):
        name = f"images_{FACTOR}/image{index:03d}.png"
        assert (again / name).read_bytes() == (first / name).read_bytes()
        assert (other / name).read_bytes() != (first / name).read_bytes()
    assert (again / "poses_bounds.npy").read_bytes() == (first / "poses_bounds.npy").read_bytes()


@pytest.mark.parametrize("pair", [(0, 1), (3, 12), (7, 19)])
def test_multiview_consistency(scene_dir, pair):
    c2w, K = cameras_from_poses_bounds(scene_dir)
    a, b = pair
    error, kept = reprojection_error(read_rgb(scene_dir, a), read_depth(scene_dir, a), K, c2w[a],
                                     read_rgb(scene_dir, b), read_depth(scene_dir, b), K, c2w[b])
    assert kept > 500  # of ~1,500 grid points
    assert error < 0.06, f"views {a}->{b}: mean colour difference {error:.3f}"


def test_wrong_pose_breaks_consistency(scene_dir):
    """Guards the consistency test itself: a slightly wrong camera must be detected."""
    c2w, K = cameras_from_poses_bounds(scene_dir)
    shifted = c2w[1].copy()
    shifted[:3, 3] += shifted[:3, 0] * 0.15  # 15 cm to the right
    good, _ = reprojection_error(read_rgb(scene_dir, 0), read_depth(scene_dir, 0), K, c2w[0],
                                 read_rgb(scene_dir, 1), read_depth(scene_dir, 1), K, c2w[1])
    bad, _ = reprojection_error(read_rgb(scene_dir, 0), read_depth(scene_dir, 0), K, c2w[0],
                                read_rgb(scene_dir, 1), read_depth(scene_dir, 1), K, shifted)
    assert bad > 2 * good


def test_loader_reads_generated_scene(scene_dir):
    """Generator and LLFF loader agree on conventions: rescaled GT depth reprojects onto matching colours."""
    llff = pytest.importorskip("data.llff")
    if not hasattr(llff, "load_llff_scene"):
        pytest.skip("data.llff.load_llff_scene not written yet")
    scene = llff.load_llff_scene(scene_dir, factor=FACTOR, llffhold=8)
    assert scene.num_views == VIEWS
    np.testing.assert_array_equal(scene.test_ids, [0, 8, 16])
    for index in range(VIEWS):
        np.testing.assert_allclose(scene.images[index], read_rgb(scene_dir, index), atol=1e-6)
    scale = llff.llff_rescale_factor(np.load(scene_dir / "poses_bounds.npy")[:, 15:17])
    for a, b in [(0, 5), (8, 13), (16, 2)]:
        error, kept = reprojection_error(
            scene.images[a].astype(np.float64), read_depth(scene_dir, a) * scale,
            scene.intrinsics[a].astype(np.float64), scene.c2w[a].astype(np.float64),
            scene.images[b].astype(np.float64), read_depth(scene_dir, b) * scale,
            scene.intrinsics[b].astype(np.float64), scene.c2w[b].astype(np.float64))
        assert kept > 300
        assert error < 0.06, f"loaded views {a}->{b}: mean colour difference {error:.3f}"


def test_rerun_with_fewer_views_leaves_no_stale_images(tmp_path):
    make_synthetic_scene(tmp_path / "s", num_views=3, height=12, width=16, factor=2)
    make_synthetic_scene(tmp_path / "s", num_views=2, height=12, width=16, factor=2)
    assert len(list((tmp_path / "s" / "images_2").iterdir())) == len(list((tmp_path / "s" / "depth_2").iterdir())) == 2


def test_cli(tmp_path):
    from data.synthetic import main

    main([str(tmp_path / "cli"), "--views", "2", "--height", "12", "--width", "16", "--factor", "2", "--seed", "3"])
    rows = np.load(tmp_path / "cli" / "poses_bounds.npy")
    assert rows.shape == (2, 17)
    np.testing.assert_allclose(rows[0, [4, 9]], [24, 32])
    with Image.open(tmp_path / "cli" / "images_2" / "image001.png") as image:
        assert image.size == (16, 12)
