"""A procedural forward-facing scene in LLFF format: the project's embedded default and a test fixture.

Why: training, evaluation and tests need a real multi-view scene (parallax, occlusion, view-consistent
texture) without downloading anything. The scene is ray cast analytically, so it also comes with exact
camera z-depth maps, which make the camera conventions checkable.

World frame is OpenCV-like (x right, y down, z forward); cameras sit near z=0 and look along +z at a
textured background plane (z=10) in front of which float two textured spheres and a textured box
(depths ~3-6), lit by one directional light plus ambient (Lambertian, so colour is view-independent).

Output folder (LLFF layout, read by `data.llff.load_llff_scene(root, factor=factor)`):
    poses_bounds.npy           float64 [N, 17]: 3x5 [down, right, back, centre, hwf] pose + near, far
    images_<factor>/imageNNN.png   uint8 RGB [H, W, 3]
    depth_<factor>/imageNNN.npy    float32 [H, W] ground-truth camera z-depth
    README.txt
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from renderer.rays import camera_rays

FOV_X_DEG = 55.0
LOOK_AT = np.array([0.0, 0.0, 5.0])
CAMERA_SPREAD = (0.28, 0.18)  # ellipse half-axes (x, y) of the camera centres: ~0.5 units across
PLANE_DEPTH = 10.0
LIGHT_DIR = np.array([-0.45, -0.75, -0.5]) / np.linalg.norm([-0.45, -0.75, -0.5])  # towards the light
AMBIENT, DIFFUSE = 0.35, 0.65
SUBPIXEL_OFFSETS = ((-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25))  # 2x2 supersampling
DEPTH_MARGIN = (0.9, 1.1)  # near/far = true min/max depth times these


# ----------------------------------------------------------------------------------------------- textures

class ValueNoise:
    """Smooth 3D value noise in [0, 1] from a seeded lattice (deterministic, view-independent)."""

    def __init__(self, rng: np.random.Generator, size: int = 64):
        self.size = size
        self.values = rng.random((size, size, size))
        self.offset = rng.random(3) * size  # texture phase

    def __call__(self, points: np.ndarray, scale: float) -> np.ndarray:
        """points [..., 3] -> [...] noise of feature size ~1/scale."""
        p = points * scale + self.offset
        cell = np.floor(p)
        f = p - cell
        f = f * f * (3.0 - 2.0 * f)  # smoothstep
        i = cell.astype(np.int64) % self.size
        j = (i + 1) % self.size
        out = 0.0
        for cx in (0, 1):
            wx = f[..., 0] if cx else 1.0 - f[..., 0]
            ix = j[..., 0] if cx else i[..., 0]
            for cy in (0, 1):
                wy = f[..., 1] if cy else 1.0 - f[..., 1]
                iy = j[..., 1] if cy else i[..., 1]
                for cz in (0, 1):
                    wz = f[..., 2] if cz else 1.0 - f[..., 2]
                    iz = j[..., 2] if cz else i[..., 2]
                    out = out + wx * wy * wz * self.values[ix, iy, iz]
        return out


def mix(a, b, t: np.ndarray) -> np.ndarray:
    """Blend colours a, b ([3]) by t [...] -> [..., 3]."""
    t = np.asarray(t)[..., None]
    return np.asarray(a) * (1.0 - t) + np.asarray(b) * t


def checker(u: np.ndarray, v: np.ndarray, w: np.ndarray | float = 0.0) -> np.ndarray:
    return (np.floor(u) + np.floor(v) + np.floor(w)) % 2


def stripes(t: np.ndarray, sharpness: float = 6.0) -> np.ndarray:
    """Soft periodic stripes in [0, 1] with period 1 (soft so that 2x2 supersampling suffices)."""
    return 0.5 + 0.5 * np.tanh(sharpness * np.sin(2 * np.pi * t))


def background_texture(p: np.ndarray, noise: ValueNoise) -> np.ndarray:
    """Plane texture in plane coordinates (x, y): colourful noise, a checker, diagonal stripes."""
    x, y = p[..., 0], p[..., 1]
    hue = noise(p, 0.35)
    base = mix(mix([0.10, 0.45, 0.55], [0.95, 0.55, 0.15], hue), [0.55, 0.20, 0.55], noise(p + 17.0, 0.8) ** 2)
    base = base * (0.75 + 0.25 * checker(x / 0.6, y / 0.6))[..., None]
    base = mix(base, [0.95, 0.92, 0.80], 0.55 * stripes((x + 0.7 * y) / 0.35) * (noise(p, 1.5) > 0.45))
    return base * (0.85 + 0.3 * noise(p + 5.0, 4.0))[..., None]


def sphere_texture_a(local: np.ndarray, noise: ValueNoise) -> np.ndarray:
    """Latitude bands and a longitude checker (in sphere coordinates)."""
    r = np.linalg.norm(local, axis=-1)
    lat = np.arcsin(np.clip(local[..., 1] / r, -1, 1))
    lon = np.arctan2(local[..., 0], -local[..., 2])
    bands = stripes(lat / 0.35)
    colour = mix([0.85, 0.15, 0.20], [0.98, 0.85, 0.25], bands)
    colour = colour * (0.7 + 0.3 * checker(lon / 0.4, lat / 0.4))[..., None]
    return colour * (0.85 + 0.3 * noise(local, 3.0))[..., None]


def sphere_texture_b(local: np.ndarray, noise: ValueNoise) -> np.ndarray:
    """Marble-like swirl: stripes distorted by noise (solid texture)."""
    swirl = stripes((local[..., 0] + local[..., 1] * 0.5) * 1.6 + 2.0 * noise(local, 1.5), sharpness=2.0)
    colour = mix([0.15, 0.25, 0.75], [0.70, 0.95, 0.85], swirl)
    return colour * (0.8 + 0.4 * noise(local + 9.0, 5.0))[..., None]


def box_texture(local: np.ndarray, noise: ValueNoise) -> np.ndarray:
    """A 3D checker of two greens with grainy noise (solid texture, so every face is consistent)."""
    cells = checker(local[..., 0] / 0.2, local[..., 1] / 0.2, local[..., 2] / 0.2)
    colour = mix([0.20, 0.55, 0.20], [0.85, 0.90, 0.55], cells)
    return colour * (0.75 + 0.4 * noise(local, 6.0))[..., None]


# -------------------------------------------------------------------------------------------- ray casting

@dataclass
class Hit:
    """Per-ray nearest intersection: t [R] (inf for a miss), normal [R, 3], colour [R, 3]."""

    t: np.ndarray
    normal: np.ndarray
    colour: np.ndarray


def intersect_sphere(o, d, centre, radius):
    """Smallest positive t of o + t d on the sphere ([R], inf for a miss) and the normal [R, 3]."""
    oc = o - centre
    a = (d * d).sum(-1)
    b = (oc * d).sum(-1)
    c = (oc * oc).sum(-1) - radius**2
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    t = (-b - root) / a
    t = np.where((disc >= 0) & (t > 1e-6), t, np.inf)
    normal = (o + np.where(np.isfinite(t), t, 0.0)[:, None] * d - centre) / radius
    return t, normal


def intersect_box(o, d, lo, hi):
    """Slab test for an axis-aligned box: entry t ([R], inf for a miss) and the entry face normal."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t0, t1 = (lo - o) * inv, (hi - o) * inv
    near, far = np.minimum(t0, t1), np.maximum(t0, t1)
    t_in, t_out = near.max(-1), far.min(-1)
    t = np.where((t_in <= t_out) & (t_in > 1e-6), t_in, np.inf)
    axis = near.argmax(-1)
    normal = np.zeros_like(d)
    normal[np.arange(len(d)), axis] = -np.sign(d[np.arange(len(d)), axis])
    return t, normal


def intersect_plane(o, d, depth):
    """The plane z = depth (facing the cameras)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (depth - o[:, 2]) / d[:, 2]
    t = np.where(np.isfinite(t) & (t > 1e-6), t, np.inf)
    normal = np.broadcast_to(np.array([0.0, 0.0, -1.0]), d.shape)
    return t, normal


class ProceduralScene:
    """Background plane + two spheres + one box; `cast` returns the nearest hit's depth and shaded colour."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.noise = ValueNoise(rng)
        self.sphere_a = (np.array([-0.95, 0.35, 4.2]), 0.75)
        self.sphere_b = (np.array([0.95, -0.35, 5.8]), 1.0)
        box_centre, box_half = np.array([-0.1, -0.7, 3.2]), np.array([0.45, 0.3, 0.35])
        self.box = (box_centre - box_half, box_centre + box_half)  # (min corner, max corner)

    def cast(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """o, d [R, 3] -> (t [R], rgb [R, 3] in [0, 1]); t is the camera depth for rays with unit camera z."""
        hits = [
            intersect_plane(o, d, PLANE_DEPTH),
            intersect_sphere(o, d, *self.sphere_a),
            intersect_sphere(o, d, *self.sphere_b),
            intersect_box(o, d, *self.box),
        ]
        ts = np.stack([t for t, _ in hits])  # [4, R]
        nearest = ts.argmin(0)
        t = ts.min(0)
        points = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
        normal = np.zeros_like(d)
        colour = np.zeros_like(d)
        textures = [
            lambda p: background_texture(p, self.noise),
            lambda p: sphere_texture_a(p - self.sphere_a[0], self.noise),
            lambda p: sphere_texture_b(p - self.sphere_b[0], self.noise),
            lambda p: box_texture(p - (self.box[0] + self.box[1]) / 2, self.noise),
        ]
        for k, ((_, n), texture) in enumerate(zip(hits, textures)):
            mask = nearest == k
            if mask.any():
                normal[mask] = n[mask]
                colour[mask] = texture(points[mask])
        shade = AMBIENT + DIFFUSE * np.clip(normal @ LIGHT_DIR, 0.0, None)
        return t, np.clip(colour * shade[:, None], 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- cameras

def look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world [4, 4] at `centre` looking at `target`, image 'down' close to world +y."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, down, forward], axis=1)
    c2w[:3, 3] = centre
    return c2w


def camera_poses(num_views: int, rng: np.random.Generator) -> np.ndarray:
    """[N, 4, 4] cameras on a jittered ellipse/spiral in the z=0 plane (like a hand-held LLFF capture)."""
    angles = 2 * np.pi * np.arange(num_views) / num_views * 2.0 + rng.uniform(0, 2 * np.pi)
    radii = 0.55 + 0.45 * np.linspace(0.0, 1.0, num_views)  # two loops, growing outward
    centres = np.stack([CAMERA_SPREAD[0] * radii * np.cos(angles), CAMERA_SPREAD[1] * radii * np.sin(angles),
                        np.zeros(num_views)], axis=1)
    centres += rng.normal(scale=0.02, size=centres.shape) * [1, 1, 0.5]
    targets = LOOK_AT + rng.normal(scale=0.05, size=(num_views, 3))
    return np.stack([look_at(c, t) for c, t in zip(centres, targets)])


def intrinsics(height: int, width: int) -> np.ndarray:
    """Pinhole K [3, 3] with the principal point at (W/2, H/2), as `load_llff_scene` builds it."""
    focal = 0.5 * width / np.tan(np.radians(FOV_X_DEG) / 2)
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


def render_view(scene: ProceduralScene, K: np.ndarray, c2w: np.ndarray, height: int, width: int):
    """-> (rgb [H, W, 3] float in [0, 1], 2x2-supersampled; depth [H, W] float from the pixel-centre ray)."""
    origins, dirs = camera_rays(torch.as_tensor(K), torch.as_tensor(c2w), height, width)
    origins = origins.reshape(-1, 3).double().numpy()
    dirs = dirs.reshape(-1, 3).double().numpy()
    pixel_step = c2w[:3, :3] @ np.linalg.inv(K)  # d(direction) / d(u, v, 0)

    def cast(offset):
        return scene.cast(origins, dirs + pixel_step @ np.array([offset[0], offset[1], 0.0]))

    depth, _ = cast((0.0, 0.0))
    rgb = sum(cast(offset)[1] for offset in SUBPIXEL_OFFSETS) / len(SUBPIXEL_OFFSETS)
    return rgb.reshape(height, width, 3), depth.reshape(height, width)


# ------------------------------------------------------------------------------------------------ writing

def llff_pose_row(c2w: np.ndarray, hwf: np.ndarray, near: float, far: float) -> np.ndarray:
    """OpenCV c2w -> one poses_bounds.npy row [17]: 3x5 [down, right, back, centre, hwf] flattened, near, far."""
    mat = np.stack([c2w[:3, 1], c2w[:3, 0], -c2w[:3, 2], c2w[:3, 3], hwf], axis=1)
    return np.concatenate([mat.reshape(-1), [near, far]])


def make_synthetic_scene(out_dir, num_views: int = 20, height: int = 72, width: int = 96, factor: int = 4,
                         seed: int = 0) -> Path:
    """Render the procedural scene into `out_dir` in LLFF format (see module docstring); returns the folder.

    `factor` only names the image folders and scales the stored hwf (full resolution = factor x size),
    mimicking a real LLFF capture downsampled by `factor`.
    """
    out = Path(out_dir)
    image_dir, depth_dir = out / f"images_{factor}", out / f"depth_{factor}"
    for folder, pattern in ((image_dir, "image*.png"), (depth_dir, "image*.npy")):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(pattern):  # a rerun with fewer views must not leave extra images behind
            stale.unlink()
    rng = np.random.default_rng(seed)
    scene = ProceduralScene(seed)
    poses = camera_poses(num_views, rng)
    K = intrinsics(height, width)
    hwf = factor * np.array([height, width, K[0, 0]])
    rows, depth_ranges = [], []
    for index, c2w in enumerate(poses):
        rgb, depth = render_view(scene, K, c2w, height, width)
        name = f"image{index:03d}"
        Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(image_dir / f"{name}.png")
        np.save(depth_dir / f"{name}.npy", depth.astype(np.float32))
        near, far = depth.min() * DEPTH_MARGIN[0], depth.max() * DEPTH_MARGIN[1]
        rows.append(llff_pose_row(c2w, hwf, near, far))
        depth_ranges.append((depth.min(), depth.max()))
    np.save(out / "poses_bounds.npy", np.stack(rows).astype(np.float64))
    depth_ranges = np.array(depth_ranges)
    (out / "README.txt").write_text(
        "Procedural forward-facing scene (ShiftAdd-GNT data/synthetic.py), LLFF format.\n"
        f"generator: make_synthetic_scene(num_views={num_views}, height={height}, width={width}, "
        f"factor={factor}, seed={seed})\n"
        "world frame: OpenCV-like (x right, y down, z forward); cameras near z=0 on a jittered two-loop\n"
        f"ellipse (half-axes {CAMERA_SPREAD}), looking at ~{LOOK_AT.tolist()}, horizontal FOV {FOV_X_DEG} deg,\n"
        f"focal {K[0, 0]:.4f} px at {width}x{height} (principal point at W/2, H/2).\n"
        f"geometry: textured plane z={PLANE_DEPTH}; sphere r={scene.sphere_a[1]} at {scene.sphere_a[0].tolist()};\n"
        f"sphere r={scene.sphere_b[1]} at {scene.sphere_b[0].tolist()}; box {scene.box[0].tolist()} - {scene.box[1].tolist()}.\n"
        f"shading: Lambertian, light direction {np.round(LIGHT_DIR, 3).tolist()}, ambient {AMBIENT}, diffuse {DIFFUSE};\n"
        "solid/surface textures (checker, stripes, value noise) in object coordinates, so colours are view-consistent.\n"
        "anti-aliasing: 2x2 supersampling; depth maps from the pixel-centre ray.\n"
        f"true depth range over all views: {depth_ranges[:, 0].min():.3f} - {depth_ranges[:, 1].max():.3f}\n"
        f"poses_bounds.npy: N x 17 (3x5 [down, right, back, centre, hwf], near, far); hwf at full resolution\n"
        f"(= {factor} x image size); near/far = true min/max depth x {DEPTH_MARGIN}.\n"
        f"images_{factor}/imageNNN.png: uint8 RGB {height}x{width}; depth_{factor}/imageNNN.npy: float32 camera z-depth.\n"
    )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the procedural LLFF-format scene.")
    parser.add_argument("out_dir")
    parser.add_argument("--views", type=int, default=20)
    parser.add_argument("--height", type=int, default=72)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = make_synthetic_scene(args.out_dir, args.views, args.height, args.width, args.factor, args.seed)
    print(f"wrote {out} ({args.views} views, {args.height}x{args.width}) in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
