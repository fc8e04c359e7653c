"""Projection of sample points into source views, and the gathering of colours/features there."""
import math

import torch

from gnt_shiftadd.models.projector import (
    SourceViews,
    gather_from_source_views,
    project_points,
    relative_direction_code,
)
from renderer.rays import rays_from_pixels


def rotation_from_axis_angle(axis: torch.Tensor, angle: float) -> torch.Tensor:
    """Rodrigues: [3] axis, angle -> [3, 3] rotation."""
    x, y, z = (axis / axis.norm()).tolist()
    skew = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=axis.dtype)
    eye = torch.eye(3, dtype=axis.dtype)
    return eye + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew


def random_camera(gen: torch.Generator, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """K [3, 3] with fx != fy and an off-centre principal point; c2w [4, 4] with random rotation/translation."""
    rot = rotation_from_axis_angle(torch.randn(3, generator=gen, dtype=dtype), float(torch.rand(1, generator=gen)) * 3.0)
    c2w = torch.eye(4, dtype=dtype)
    c2w[:3, :3] = rot
    c2w[:3, 3] = torch.randn(3, generator=gen, dtype=dtype) * 2.0
    K = torch.tensor([[55.0, 0.0, 18.5], [0.0, 48.0, 10.25], [0.0, 0.0, 1.0]], dtype=dtype)
    return K, c2w


def look_at_camera(position, target, dtype=torch.float32) -> torch.Tensor:
    """OpenCV c2w at `position` looking at `target` (y down)."""
    position, target = torch.tensor(position, dtype=dtype), torch.tensor(target, dtype=dtype)
    forward = torch.nn.functional.normalize(target - position, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, torch.tensor([0.0, -1.0, 0.0], dtype=dtype)), dim=0)
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4, dtype=dtype)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, position
    return c2w


# ---------------------------------------------------------------- projection


def test_round_trip_recovers_pixels_and_depths():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        K, c2w = random_camera(gen)
        pixels = torch.rand(7, 11, 2, generator=gen, dtype=torch.float64) * torch.tensor([40.0, 30.0], dtype=torch.float64)
        depths = 0.5 + 10.0 * torch.rand(7, 11, generator=gen, dtype=torch.float64)
        origins, dirs = rays_from_pixels(pixels, K, c2w)
        points = origins + depths[..., None] * dirs
        projected, depth = project_points(points, K[None], c2w[None])
        assert projected.shape == (1, 7, 11, 2) and depth.shape == (1, 7, 11)
        torch.testing.assert_close(projected[0], pixels, atol=1e-4, rtol=0)
        torch.testing.assert_close(depth[0], depths, atol=1e-4, rtol=0)


def test_round_trip_in_float32():
    gen = torch.Generator().manual_seed(1)
    K, c2w = random_camera(gen, dtype=torch.float32)
    pixels = torch.rand(100, 2, generator=gen) * torch.tensor([40.0, 30.0])
    depths = 1.0 + 4.0 * torch.rand(100, generator=gen)
    origins, dirs = rays_from_pixels(pixels, K, c2w)
    projected, depth = project_points(origins + depths[:, None] * dirs, K[None], c2w[None])
    torch.testing.assert_close(projected[0], pixels, atol=1e-3, rtol=0)
    torch.testing.assert_close(depth[0], depths, atol=1e-4, rtol=1e-5)


def test_projection_into_second_camera_matches_analytic_answer():
    """Camera 1 looks along world +x (its x axis = world -z, y = world +y); camera 0 is the identity."""
    fx, fy, cx, cy = 50.0, 40.0, 20.0, 12.0
    K = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    c2w = torch.eye(4).repeat(2, 1, 1)
    c2w[1, :3, :3] = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # columns: x, y, z axes
    c2w[1, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    point = torch.tensor([1.0 + 3.0, 2.0 + 0.5, 3.0 - 1.0])  # offset (3, 0.5, -1): camera coords (1, 0.5, 3)
    pixels, depth = project_points(point, K, c2w)
    assert pixels.shape == (2, 2) and depth.shape == (2,)
    torch.testing.assert_close(pixels[1], torch.tensor([fx * 1 / 3 + cx, fy * 0.5 / 3 + cy]))
    torch.testing.assert_close(depth[1], torch.tensor(3.0))
    torch.testing.assert_close(pixels[0], torch.tensor([fx * 4 / 2 + cx, fy * 2.5 / 2 + cy]))
    torch.testing.assert_close(depth[0], torch.tensor(2.0))


def test_points_on_the_camera_plane_stay_finite():
    K = torch.eye(3)[None]
    c2w = torch.eye(4)[None]
    pixels, depth = project_points(torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, -2.0]]), K, c2w)
    assert torch.isfinite(pixels).all() and torch.isfinite(depth).all()
    assert depth[0].tolist() == [0.0, 0.0, -2.0]


# ---------------------------------------------------------------- relative direction code


def test_relative_direction_code_properties():
    gen = torch.Generator().manual_seed(2)
    points = torch.randn(5, 6, 3, generator=gen)
    target = torch.randn(3, generator=gen)
    sources = torch.cat([torch.randn(3, 3, generator=gen), target[None]])  # last source == target
    code = relative_direction_code(points, target, sources)
    assert code.shape == (5, 6, 4, 4)
    assert torch.isfinite(code).all()
    torch.testing.assert_close(code[:, :, :3, :3].norm(dim=-1), torch.ones(5, 6, 3))
    assert (code[..., 3].abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(code[:, :, 3, :3], torch.zeros(5, 6, 3))
    torch.testing.assert_close(code[:, :, 3, 3], torch.ones(5, 6))


def test_relative_direction_code_matches_definition():
    points = torch.tensor([[[0.0, 0.0, 0.0]]])
    target = torch.tensor([0.0, 0.0, -2.0])  # direction to target: -z
    sources = torch.tensor([[3.0, 0.0, 0.0]])  # direction to source: +x
    code = relative_direction_code(points, target, sources)[0, 0, 0]
    expected_dir = torch.tensor([-1.0, 0.0, -1.0]) / math.sqrt(2.0)
    torch.testing.assert_close(code, torch.cat([expected_dir, torch.tensor([0.0])]))


def test_relative_direction_code_point_at_camera_centre_is_finite():
    target = torch.tensor([1.0, 2.0, 3.0])
    code = relative_direction_code(target.reshape(1, 1, 3), target, torch.stack([target, torch.zeros(3)]))
    assert torch.isfinite(code).all()


# ---------------------------------------------------------------- gathering

H, W = 24, 32


def coordinate_image() -> torch.Tensor:
    """[H, W, 3]: R = u / (W - 1), G = v / (H - 1), B = 0.5 — bilinear sampling reproduces the coordinates."""
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return torch.stack([u / (W - 1), v / (H - 1), torch.full_like(u, 0.5)], dim=-1)


def coordinate_features(h: int, w: int) -> torch.Tensor:
    """[2, h, w] ramps covering the same image extent: channel 0 = u / (W - 1), channel 1 = v / (H - 1)."""
    v, u = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([u, v])


def make_views() -> SourceViews:
    K = torch.tensor([[30.0, 0.0, 15.5], [0.0, 28.0, 11.0], [0.0, 0.0, 1.0]])
    c2w = torch.stack([
        look_at_camera([0.0, 0.0, -4.0], [0.0, 0.0, 0.0]),
        look_at_camera([1.0, -0.5, -4.0], [0.0, 0.0, 0.0]),
        look_at_camera([-1.5, 0.3, -3.5], [0.0, 0.2, 0.0]),
    ])
    rgb = coordinate_image().expand(3, H, W, 3).clone()
    features = coordinate_features(H // 4, W // 4).expand(3, 2, H // 4, W // 4).clone()
    return SourceViews(rgb=rgb, features=features, K=K.expand(3, 3, 3).clone(), c2w=c2w)


def test_gather_reproduces_projected_coordinates():
    torch.manual_seed(3)
    views = make_views()
    points = torch.randn(10, 8, 3) * 0.7  # around the origin, seen by every camera
    target_origin = torch.tensor([0.2, 0.1, -4.0])
    rgb_feat, ray_diff, mask = gather_from_source_views(points, target_origin, views)
    assert rgb_feat.shape == (10, 8, 3, 5)
    assert ray_diff.shape == (10, 8, 3, 4)
    assert mask.shape == (10, 8, 3, 1) and mask.dtype == points.dtype

    pixels, depth = project_points(points, views.K, views.c2w)  # [V, R, S, 2]
    expected = (pixels / torch.tensor([W - 1.0, H - 1.0])).permute(1, 2, 0, 3)  # [R, S, V, 2]
    visible = mask[..., 0].bool()
    assert visible.float().mean() > 0.8
    torch.testing.assert_close(rgb_feat[..., :2][visible], expected[visible], atol=1e-5, rtol=0)
    torch.testing.assert_close(rgb_feat[..., 2][visible], torch.full_like(rgb_feat[..., 2][visible], 0.5))
    # features at 1/4 resolution sampled at the same normalised coordinates
    torch.testing.assert_close(rgb_feat[..., 3:][visible], expected[visible], atol=1e-5, rtol=0)
    torch.testing.assert_close(ray_diff, relative_direction_code(points, target_origin, views.c2w[:, :3, 3]))


def test_pixel_rays_sample_their_own_pixel():
    """A sample on the ray through pixel (i, j) of a view reads exactly rgb[i, j] of that view."""
    torch.manual_seed(4)
    views = make_views()
    views.rgb = torch.rand(3, H, W, 3)
    rows, cols = torch.randint(0, H, (20,)), torch.randint(0, W, (20,))
    pixels = torch.stack([cols, rows], dim=-1).float()
    origins, dirs = rays_from_pixels(pixels, views.K[1], views.c2w[1])
    points = origins[:, None] + torch.linspace(1.0, 6.0, 5)[None, :, None] * dirs[:, None]  # [20, 5, 3]
    rgb_feat, _, mask = gather_from_source_views(points, views.c2w[0, :3, 3], views)
    interior = (rows > 0) & (rows < H - 1) & (cols > 0) & (cols < W - 1)  # border pixels may round just outside
    assert mask[interior, :, 1].all()
    torch.testing.assert_close(rgb_feat[:, :, 1, :3], views.rgb[1, rows, cols][:, None].expand(20, 5, 3), atol=1e-5, rtol=0)


def test_points_behind_or_outside_are_masked():
    views = make_views()
    K, c2w = views.K[0], views.c2w[0]
    pixels = torch.tensor([[10.0, 5.0], [W + 5.0, 5.0], [10.0, -6.0], [W - 1.0 + 1e-2, H - 1.0]])
    origins, dirs = rays_from_pixels(pixels, K, c2w)
    points = torch.stack([origins + 2.0 * dirs, origins - 2.0 * dirs], dim=1)  # [4, 2, 3]: in front, behind
    rgb_feat, _, mask = gather_from_source_views(points, torch.zeros(3), views)
    assert mask[0, 0, 0] == 1
    assert (mask[:, 1, 0] == 0).all()  # behind the camera
    assert (mask[1:, 0, 0] == 0).all()  # outside the image
    assert (rgb_feat[1:3, 0, 0] == 0).all()  # zeros padding far outside
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_all_views_invisible_gives_zero_mask_and_finite_values():
    views = make_views()
    points = torch.randn(6, 4, 3) * 0.1 + torch.tensor([0.0, 0.0, -40.0])  # behind all cameras
    points[0, 0] = views.c2w[0, :3, 3]  # exactly at a camera centre
    rgb_feat, ray_diff, mask = gather_from_source_views(points, views.c2w[0, :3, 3], views)
    assert (mask == 0).all()
    assert torch.isfinite(rgb_feat).all() and torch.isfinite(ray_diff).all()


def test_gradients_flow_to_features_and_points():
    views = make_views()
    views.features = views.features.clone().requires_grad_(True)
    points = (torch.randn(4, 3, 3) * 0.5).requires_grad_(True)
    rgb_feat, _, mask = gather_from_source_views(points, torch.tensor([0.0, 0.0, -4.0]), views)
    (rgb_feat * mask).sum().backward()
    assert views.features.grad.abs().sum() > 0
    assert torch.isfinite(points.grad).all() and points.grad.abs().sum() > 0
