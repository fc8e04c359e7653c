import numpy as np
import torch

from renderer.camera_path import spiral_path
from renderer.rays import camera_rays
from renderer.sampling import sample_inverse_depth
from renderer.video import write_video


def test_inverse_depth_samples_are_even_in_disparity():
    o = torch.zeros(4, 3)
    d = torch.tensor([[0.0, 0.0, 1.0]]).repeat(4, 1)
    z, pts = sample_inverse_depth(o, d, 2.0, 10.0, 9, stratified=False)
    assert z.shape == (4, 9) and pts.shape == (4, 9, 3)
    assert torch.allclose(z[:, 0], torch.tensor(2.0)) and torch.allclose(z[:, -1], torch.tensor(10.0))
    steps = torch.diff(1.0 / z, dim=-1)
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), atol=1e-6)
    assert torch.allclose(pts[..., 2], z)


def test_stratified_samples_stay_in_their_bins_and_are_reproducible():
    o, d = torch.zeros(64, 3), torch.randn(64, 3)
    z0, _ = sample_inverse_depth(o, d, 1.0, 5.0, 16, stratified=False)
    z1, pts = sample_inverse_depth(o, d, 1.0, 5.0, 16, stratified=True, generator=torch.Generator().manual_seed(3))
    z2, _ = sample_inverse_depth(o, d, 1.0, 5.0, 16, stratified=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2)
    assert not torch.equal(z0, z1)
    assert (torch.diff(z1, dim=-1) >= 0).all()
    assert (z1 >= 1.0).all() and (z1 <= 5.0).all()
    mids = 0.5 * (z0[:, 1:] + z0[:, :-1])
    assert (z1[:, 1:] >= mids - 1e-6).all() and (z1[:, :-1] <= mids + 1e-6).all()
    assert torch.allclose(pts, o[:, None] + z1[..., None] * d[:, None], atol=1e-5)


def test_pixel_rays_project_back_onto_their_pixels():
    from gnt_shiftadd.models.projector import project_points

    K = torch.tensor([[50.0, 0, 20.5], [0, 55.0, 14.0], [0, 0, 1]])
    angle = torch.tensor(0.3)
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.tensor([[torch.cos(angle), 0, torch.sin(angle)], [0, 1, 0], [-torch.sin(angle), 0, torch.cos(angle)]])
    c2w[:3, 3] = torch.tensor([0.3, -0.2, 1.0])
    origins, dirs = camera_rays(K, c2w, 29, 41, stride=2)
    pts = origins + 3.7 * dirs
    pixels, depth = project_points(pts, K[None], c2w[None])
    v, u = torch.meshgrid(torch.arange(0, 29, 2.0), torch.arange(0, 41, 2.0), indexing="ij")
    assert torch.allclose(pixels[0], torch.stack([u, v], -1), atol=1e-3)
    assert torch.allclose(depth[0], torch.full_like(depth[0], 3.7), atol=1e-4)


def test_spiral_path_poses_are_valid_and_look_at_the_scene():
    rng = np.random.default_rng(0)
    c2w = np.repeat(np.eye(4, dtype=np.float32)[None], 10, axis=0)
    c2w[:, :2, 3] = rng.normal(scale=0.1, size=(10, 2))
    poses = spiral_path(c2w, np.array([[1.0, 10.0]] * 10), n_frames=12)
    assert poses.shape == (12, 4, 4)
    R = poses[:, :3, :3]
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-5)
    assert np.allclose(np.linalg.det(R), 1.0, atol=1e-5)
    assert (R[:, 2, 2] > 0.95).all()  # still looking forward (+z)
    assert np.ptp(poses[:, 0, 3]) > 0.05  # and moving around


def test_video_is_written_for_odd_frame_sizes(tmp_path):
    frames = [np.full((15, 21, 3), i / 4.0, dtype=np.float32) for i in range(4)]
    path = write_video(frames, tmp_path / "v.mp4", fps=5)
    assert path is not None and path.stat().st_size > 0
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    assert meta["size"] == (22, 16)  # padded to even sizes for H.264
    assert sum(1 for _ in reader) == 4


def test_renderer_samples_then_calls_the_radiance_function_in_chunks():
    from renderer.render import Renderer, RenderSettings

    settings = RenderSettings(n_samples=5, stride=2, chunk=7)
    renderer = Renderer(settings)
    o = torch.zeros(3, 3)
    d = torch.tensor([[0.0, 0.0, 1.0]]).repeat(3, 1)
    seen = []

    def radiance(points, directions, origins):  # colour = mean depth of the samples, so sampling is visible
        seen.append(points.shape)
        return points[..., 2].mean(dim=1, keepdim=True).expand(-1, 3)

    _, expected_points = sample_inverse_depth(o, d, 1.0, 4.0, 5, stratified=False)
    rgb = renderer.render_rays(radiance, o, d, 1.0, 4.0)
    torch.testing.assert_close(rgb, expected_points[..., 2].mean(dim=1, keepdim=True).expand(-1, 3))
    K = torch.tensor([[10.0, 0.0, 5.0], [0.0, 10.0, 4.0], [0.0, 0.0, 1.0]])
    image = renderer.render_image(lambda p, dd, oo: torch.full((p.shape[0], 3), 0.25), K, torch.eye(4), 8, 10,
                                  1.0, 4.0, torch.device("cpu"))
    assert image.shape == (4, 5, 3) and torch.all(image == 0.25)  # stride 2; 20 rays in chunks of 7
    assert seen == [(3, 5, 3)]
