"""Scene readers on real data (NeRF-synthetic chair, nerfstudio fox, fern through COLMAP), format detection,
scene kind and the sampling it selects, and one clear line for each bad input."""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, tiny_overrides

from data.blender import load_blender_scene
from data.cameras import undistort_image
from data.formats import describe_scene, detect_format, load_any_scene
from data.llff import load_llff_scene
from data.scene import AROUND_360, FORWARD_FACING, SceneError
from data.transforms_json import load_transforms_scene
from gnt_shiftadd.models.projector import project_points
from renderer.rays import rays_from_pixels
from renderer.sampling import sample_along_rays

DATA = REPO_ROOT.parent / "shared" / "data"
CHAIR = DATA / "nerf_synthetic" / "chair"
FOX = DATA / "nerfstudio_format" / "fox"
FERN = DATA / "nerf_llff_data" / "fern"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real scene not found at {path}")
    return path


@pytest.fixture(scope="module")
def chair():
    return load_blender_scene(need(CHAIR), factor=8)


@pytest.fixture(scope="module")
def fox():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bounds-estimate notice; checked in its own test
        return load_transforms_scene(need(FOX), factor=8)


# ------------------------------------------------------------------------------------------ detection

def test_formats_are_detected_from_the_folder(tmp_path):
    assert detect_format(need(FERN)) == "llff"
    assert detect_format(need(CHAIR)) == "blender"
    assert detect_format(need(FOX)) == "transforms"
    with pytest.raises(SceneError, match="cannot tell the scene format.*prepare"):
        detect_format(tmp_path)
    with pytest.raises(SceneError, match="does not exist"):
        detect_format(tmp_path / "nowhere")


def test_data_format_is_a_checked_config_key():
    from gnt_shiftadd.config import ConfigError, load_config

    assert load_config(None, ["data.format=colmap"]).data.format == "colmap"
    with pytest.raises(ConfigError, match="data.format must be one of auto, llff, colmap, transforms, blender"):
        load_config(None, ["data.format=nerfies"])


# ------------------------------------------------------------------------------------ NeRF-synthetic

def test_chair_facts(chair):
    # 100 train + 25 test frames (val unused); 800 px at 1/8 = 100 px; focal 1111.1 px at 800 -> 138.89
    assert chair.images.shape == (125, 100, 100, 3)
    assert len(chair.train_ids) == 100 and len(chair.test_ids) == 25
    assert not set(chair.train_ids) & set(chair.test_ids)
    np.testing.assert_allclose(chair.intrinsics[:, 0, 0], 1111.111 / 8, rtol=1e-4)
    np.testing.assert_allclose(chair.intrinsics[0, :2, 2], [49.5, 49.5])  # centre, pixel-centre convention
    assert chair.depth_range() == (2.0, 6.0) and chair.source_format == "blender"
    assert chair.kind == AROUND_360
    # transparent background composited on white; the chair itself is not white
    assert np.all(chair.images[:, 0, 0] == 1.0)
    assert chair.images[:, 40:60, 40:60].mean() < 0.9


def test_chair_alpha_is_composited_on_white(chair):
    rgba = np.asarray(Image.open(CHAIR / "test" / "r_0.png").convert("RGBA"), dtype=np.float64) / 255.0
    block = rgba.reshape(100, 8, 100, 8, 4)  # the 1/8 image averages 8x8 blocks, premultiplied
    alpha = block[..., 3].mean(axis=(1, 3))
    colour = (block[..., :3] * block[..., 3:]).mean(axis=(1, 3))
    expected = colour + (1.0 - alpha[..., None])
    view = int(chair.test_ids[0])
    assert Path(chair.image_paths[view]).name == "r_0.png"
    np.testing.assert_allclose(chair.images[view], expected, atol=2e-3)


def test_chair_cameras_are_opencv_and_look_at_the_object(chair):
    # OpenGL -> OpenCV: the object (world origin) is in front of every camera (positive z) and inside its image
    pixels, depth = project_points(torch.zeros(1, 3), torch.from_numpy(chair.intrinsics), torch.from_numpy(chair.c2w))
    assert (depth > 2.0).all() and (depth < 6.0).all()
    assert ((pixels[:, 0] - 49.5).abs() < 5).all()


# ---------------------------------------------------------------------------- nerfstudio / instant-ngp

def test_fox_intrinsics_keep_the_off_centre_principal_point(fox):
    # fl_x 1375.52, fl_y 1374.49, cx 554.558, cy 965.268 at 1080x1920; 1/8 -> 135x240 (corner -> centre: -0.5)
    assert fox.images.shape == (50, 240, 135, 3)
    K = fox.intrinsics[0]
    np.testing.assert_allclose([K[0, 0], K[1, 1]], [1375.52 / 8, 1374.49 / 8], rtol=1e-6)
    np.testing.assert_allclose([K[0, 2], K[1, 2]], [554.558 / 8 - 0.5, 965.268 / 8 - 0.5], rtol=1e-6)
    assert K[0, 2] - (135 - 1) / 2 > 1.5  # 14.6 px right of the centre at full size: 1.8 px here
    assert len(fox.test_ids) == 7 and list(fox.test_ids[:3]) == [0, 8, 16]
    assert fox.kind == AROUND_360 and fox.source_format == "transforms"


def test_fox_bounds_are_estimated_and_announced():
    with pytest.warns(UserWarning, match="no depths; near/far estimated"):
        scene = load_transforms_scene(need(FOX), factor=16)
    near, far = scene.depth_range()
    # after rescaling the nearest bound is 1/0.75; every camera sees the origin (the fox) between near and far
    np.testing.assert_allclose(scene.bounds[:, 0].min(), 1 / 0.75, rtol=1e-5)
    _, depth = project_points(torch.zeros(1, 3), torch.from_numpy(scene.intrinsics), torch.from_numpy(scene.c2w))
    assert (depth > near).all() and (depth < far).all()


def test_fox_off_centre_principal_point_end_to_end(fox):
    """Rays from the reader's K (fx != fy, cx, cy off centre) project back onto their pixels in every view."""
    K, c2w = torch.from_numpy(fox.intrinsics), torch.from_numpy(fox.c2w)
    pixels = torch.tensor([[3.0, 5.0], [130.0, 17.0], [67.0, 200.0]])
    origins, dirs = rays_from_pixels(pixels, K[4], c2w[4])
    points = origins + 2.5 * dirs
    projected, depth = project_points(points, K, c2w)
    torch.testing.assert_close(projected[4], pixels, atol=1e-3, rtol=0)
    torch.testing.assert_close(depth[4], torch.full((3,), 2.5), atol=1e-4, rtol=0)


def test_undistortion_moves_a_dot_to_its_pinhole_position():
    """A dot the fox's lens (OPENCV k1 k2 p1 p2) put at its distorted position lands at the pinhole projection."""
    meta = json.loads((need(FOX) / "transforms.json").read_text())
    width, height = 540, 960  # the camera at 1/2 size (distortion coefficients are scale-free)
    s = width / meta["w"]
    camera = pycolmap.Camera(model="OPENCV", width=width, height=height,
                             params=[meta["fl_x"] * s, meta["fl_y"] * s, meta["cx"] * s, meta["cy"] * s,
                                     meta["k1"], meta["k2"], meta["p1"], meta["p2"]])
    x, y = 0.35, 0.55  # near the corner: the fox's k1 and k2 nearly cancel closer to the centre
    point = np.array([[x, y, 1.0]])
    distorted = camera.img_from_cam(point)[0]
    pinhole = np.array([camera.focal_length_x * x + camera.principal_point_x,
                        camera.focal_length_y * y + camera.principal_point_y])
    assert np.linalg.norm(distorted - pinhole) > 3.0
    image = np.zeros((height, width, 1), np.float32)
    u, v = np.floor(distorted).astype(int)
    image[v - 1 : v + 2, u - 1 : u + 2] = 1.0  # 3x3 dot centred on the distorted pixel centre (corner origin)
    undistorted = undistort_image(image, camera)[..., 0]
    rows, cols = np.nonzero(undistorted > 0.01)
    weights = undistorted[rows, cols]
    centroid = np.array([(cols * weights).sum(), (rows * weights).sum()]) / weights.sum() + 0.5
    expected = pinhole + (np.floor(distorted) + 0.5 - distorted)  # the dot's sub-pixel offset, carried over
    assert np.linalg.norm(centroid - expected) < 0.35


# -------------------------------------------------------------------------------- kind and sampling

def test_scene_kind_is_measured_and_described(chair):
    fern = load_any_scene(need(FERN), factor=8)
    assert fern.kind == FORWARD_FACING
    assert "kind forward_facing" in describe_scene(fern) and "inverse depth" in describe_scene(fern)
    assert "kind 360" in describe_scene(chair) and "linear in depth" in describe_scene(chair)


def test_sampling_follows_the_kind():
    origins, dirs = torch.zeros(2, 3), torch.tensor([[0.0, 0.0, 1.0], [0.1, 0.0, 1.0]])
    z_ff, _ = sample_along_rays(origins, dirs, 2.0, 6.0, 5, stratified=False, kind=FORWARD_FACING)
    z_360, points = sample_along_rays(origins, dirs, 2.0, 6.0, 5, stratified=False, kind=AROUND_360)
    torch.testing.assert_close(z_360[0], torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0]))
    torch.testing.assert_close(1.0 / z_ff[0], torch.linspace(0.5, 1.0 / 6.0, 5))
    torch.testing.assert_close(points[1, 2], torch.tensor([0.4, 0.0, 4.0]))
    gen = torch.Generator().manual_seed(0)
    z_strat, _ = sample_along_rays(origins, dirs, 2.0, 6.0, 5, stratified=True, generator=gen, kind=AROUND_360)
    assert (z_strat >= 2.0).all() and (z_strat <= 6.0).all() and (z_strat.diff(dim=-1) >= 0).all()
    with pytest.raises(ValueError, match="unknown scene kind"):
        sample_along_rays(origins, dirs, 2.0, 6.0, 5, stratified=False, kind="spherical")


def test_training_batches_carry_the_scene_kind(chair):
    from gnt_shiftadd.experiment import SceneTensors
    from gnt_shiftadd.training.batch import sample_training_batch

    batch = sample_training_batch(SceneTensors(chair, torch.device("cpu")), np.random.default_rng(0), 16, 3)
    assert batch.kind == AROUND_360 and (batch.near, batch.far) == (2.0, 6.0)


# --------------------------------------------------------------------------------------- bad inputs

def _write_transforms(root: Path, frames: list[dict], **meta) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "transforms.json").write_text(json.dumps({"fl_x": 50.0, "fl_y": 50.0, **meta, "frames": frames}))
    return root


def _pose(x: float) -> list:
    return [[1, 0, 0, x], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1]]


def test_transforms_json_referencing_a_missing_file(tmp_path):
    root = _write_transforms(tmp_path / "s", [{"file_path": "images/a.png", "transform_matrix": _pose(0)},
                                              {"file_path": "images/missing.png", "transform_matrix": _pose(1)}])
    (root / "images").mkdir()
    Image.new("RGB", (8, 6)).save(root / "images" / "a.png")
    with pytest.raises(SceneError, match=r"frame 1 references 'images/missing.png', but .*missing.png does not exist"):
        load_any_scene(root)


def test_transforms_json_with_mixed_image_sizes(tmp_path):
    root = _write_transforms(tmp_path / "s", [{"file_path": "a.png", "transform_matrix": _pose(0)},
                                              {"file_path": "b.png", "transform_matrix": _pose(1)}])
    Image.new("RGB", (8, 6)).save(root / "a.png")
    Image.new("RGB", (6, 8)).save(root / "b.png")
    with pytest.raises(SceneError, match=r"images differ in size: a.png is 8x6 but b.png is 6x8"):
        load_any_scene(root, factor=1)


def test_transforms_json_bad_fields(tmp_path):
    root = _write_transforms(tmp_path / "one", [{"file_path": "a.png", "transform_matrix": _pose(0)}])
    Image.new("RGB", (8, 6)).save(root / "a.png")
    with pytest.raises(SceneError, match="has 1 frame; a scene needs at least 2"):
        load_any_scene(root)
    root = _write_transforms(tmp_path / "nan", [{"file_path": "a.png", "transform_matrix": _pose(0)},
                                                {"file_path": "a.png", "transform_matrix": [[1, 0, 0]]}])
    Image.new("RGB", (8, 6)).save(root / "a.png")
    with pytest.raises(SceneError, match="frame 1 transform_matrix has shape"):
        load_any_scene(root)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "transforms.json").write_text("{not json")
    with pytest.raises(SceneError, match="transforms.json is not valid JSON"):
        load_any_scene(tmp_path / "broken")


def test_transforms_json_size_must_match_w_h(tmp_path):
    frames = [{"file_path": "a.png", "transform_matrix": _pose(0)}, {"file_path": "a.png", "transform_matrix": _pose(1)}]
    root = _write_transforms(tmp_path / "s", frames, w=10, h=6)
    Image.new("RGB", (8, 6)).save(root / "a.png")
    with pytest.raises(SceneError, match=r"is 8x6 but the json says w=10, h=6"):
        load_any_scene(root, factor=1)


def test_blender_json_referencing_a_missing_file(tmp_path):
    root = tmp_path / "lego"
    root.mkdir()
    for split in ("train", "test"):
        frames = [{"file_path": f"./{split}/r_0", "transform_matrix": _pose(0)}]
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": frames}))
    (root / "train").mkdir()
    Image.new("RGBA", (8, 8)).save(root / "train" / "r_0.png")
    with pytest.raises(SceneError, match=r"transforms_test.json: frame 0 references './test/r_0', but"):
        load_any_scene(root)


def test_llff_images_folder_disagreeing_with_poses_falls_back_to_images(tmp_path):
    """images_2/ has 19 images for 20 poses while images/ has 20: use images/ resized, warn with both counts."""
    root = tmp_path / "fern"
    (root / "images").mkdir(parents=True)
    (root / "images_2").mkdir()
    shutil.copy(need(FERN) / "poses_bounds.npy", root)
    for k, src in enumerate(sorted((FERN / "images_8").iterdir())):
        (root / "images" / src.name).symlink_to(src)
        if k:
            (root / "images_2" / src.name).symlink_to(src)
    with pytest.warns(UserWarning, match=r"images_2/ holds 19 images but poses_bounds.npy has 20 poses; "
                                         r"images/ agrees \(20 images\), so using it resized by 1/2"):
        scene = load_llff_scene(root, factor=2)
    assert scene.images.shape == (20, 189, 252, 3)
    (root / "images" / "image000.png").unlink()  # now neither agrees: the usual error
    with pytest.raises(SceneError, match="19 images in images_2/ but 20 poses"):
        load_llff_scene(root, factor=2)


def test_video_path_orbits_a_360_scene_and_spirals_a_forward_facing_one(chair, fox):
    from renderer.camera_path import spiral_path, video_path

    poses = video_path(chair.c2w[chair.train_ids], chair.bounds, chair.kind, n_frames=8)
    pixels, depth = project_points(torch.zeros(1, 3), torch.from_numpy(chair.intrinsics[:8]), torch.from_numpy(poses))
    torch.testing.assert_close(pixels[:, 0], torch.full((8, 2), 49.5), atol=0.05, rtol=0)  # looks at the chair
    radii = np.linalg.norm(poses[:, :3, 3], axis=1)
    np.testing.assert_allclose(radii, radii[0], rtol=1e-4)  # a circle around it (chair: cameras all round)
    assert np.ptp(np.arctan2(poses[:, 1, 3], poses[:, 0, 3])) > 1.5 * np.pi
    # fox: cameras cover only part of a circle; every frame stays near a photographed viewpoint
    poses = video_path(fox.c2w[fox.train_ids], fox.bounds, fox.kind, n_frames=12)
    nearest = np.linalg.norm(poses[:, None, :3, 3] - fox.c2w[fox.train_ids][None, :, :3, 3], axis=-1).min(axis=1)
    assert nearest.max() < 0.5 * np.linalg.norm(poses[:, :3, 3], axis=1).mean()
    fern = load_any_scene(need(FERN), factor=8)
    np.testing.assert_array_equal(video_path(fern.c2w, fern.bounds, fern.kind, 5), spiral_path(fern.c2w, fern.bounds, 5))


def test_a_blender_scene_trains_evaluates_and_renders_end_to_end(tmp_path, capsys):
    """run_all on the chair (detected as blender, kind 360): linear-depth sampling, held-out test split, orbit video."""
    from gnt_shiftadd.config import load_config
    from gnt_shiftadd.workflows import run_all

    cfg = load_config(None, tiny_overrides(need(CHAIR), tmp_path / "runs", "chair") +
                      ["data.factor=16", "train.steps=2", "train.val_every=0", "eval.stride=5", "video.frames=2",
                       "video.stride=5"])
    summary = run_all(cfg, progress=False)
    assert "blender format, 125 views (100 train / 25 held out) at 50x50, kind 360" in capsys.readouterr().err
    metrics = json.loads((cfg.run_dir / "eval" / "metrics.json").read_text())
    assert len(metrics["per_view"]) == 25 and np.isfinite(metrics["mean"]["psnr"])
    assert summary is not None and (cfg.run_dir / "video" / "frames" / "frame0001.png").is_file()
