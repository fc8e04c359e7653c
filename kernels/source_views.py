"""What the source views see at the samples, in one CPU kernel: projection, bilinear gathers, mask, view codes.

`gnt_shiftadd.models.projector.sample_source_views` (the reference) projects every sample into every source view
with two batched matrix products, runs `F.grid_sample` twice (RGB and CNN features, NCHW maps, one channel
plane after the other) and builds the 4-d relative view code from half a dozen elementwise ops over
[R, S, V, 3]. On a 2-core CPU that was ~0.7 s of a 3.3 s fern frame, the same for dense and ShiftAdd models
(profile of h at commit 4a43081: grid_sampler_2d alone 549 ms). Here, per tile of 16 samples and per view:

    cam  = R^T p + t,  (z u, z v, z) = K cam                  16 samples as vector lanes
    mask = z > 1e-6 and (u, v) inside the image                [N, V]
    taps = 4 bilinear corners and weights (grid_sample's zeros padding, align_corners=True), for the image
           and for the feature map (its own size, same extent)
    rgb  = sum_taps w * image[tap]                              [V, 3, N]   (grid_sample's layout, what
    feat = sum_taps w * features_channels_last[tap, :]          [V, F, N]    the view-features kernel reads)
    ray_diff = (unit(to_target - to_source), to_target . to_source)   [N, V, 4]

The feature gathers run vector-over-channels on a channels-last copy of the maps (made once per set of source
views and reused by every chunk); a vector-over-samples gather would be 16 scalar loads per vector on this CPU.
N is padded to whole tiles by the wrapper; the tile count is symbolic, and so are the image and map sizes.
CPU (llvm) only: on CUDA the reference's grid_sample is already a native kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gnt_shiftadd.models.projector import SourceViews, sample_source_views, world_to_camera
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, needs_grad, note_kernel

__all__ = ["TILE", "SourceViewTensors", "prepare_source_views", "make_source_views", "source_views",
           "reference_source_views"]

TILE = 16  # samples per tile: the vector lanes of the projection and tap arithmetic
TILES_PER_TASK = 16  # tiles per parallel task: its scratch buffers are allocated once per task
_MIN_DEPTH = 1e-6  # as the reference (projector._MIN_DEPTH)


@dataclass(frozen=True, eq=False)
class SourceViewTensors:
    """SourceViews in the kernel's layout: rot [V, 3, 3] (world -> camera, R^T), trans [V, 3], K [V, 3, 3],
    origins [V, 3], image [V, H*W*3] (channels last, as stored), features [V, h*w*F] (channels last),
    sizes fp32 [4] = (W, H, w, h), c2w [V, 4, 4] (for the reference). All contiguous fp32 CPU tensors."""

    rot: torch.Tensor
    trans: torch.Tensor
    K: torch.Tensor
    origins: torch.Tensor
    image: torch.Tensor
    features: torch.Tensor
    sizes: torch.Tensor
    c2w: torch.Tensor

    @property
    def num_views(self) -> int:
        return self.rot.shape[0]

    @property
    def feat_channels(self) -> int:
        width, height, feat_w, feat_h = (int(s) for s in self.sizes.tolist())
        return self.features.shape[1] // (feat_w * feat_h)

    def kernel_arguments(self) -> tuple[torch.Tensor, ...]:
        return self.rot, self.trans, self.K, self.origins, self.image, self.features, self.sizes

    def source_views(self) -> SourceViews:
        """Back to the model's SourceViews (views of these tensors): what the reference takes."""
        width, height, feat_w, feat_h = (int(s) for s in self.sizes.tolist())
        num_views = self.num_views
        return SourceViews(rgb=self.image.view(num_views, height, width, 3),
                           features=self.features.view(num_views, feat_h, feat_w, -1).permute(0, 3, 1, 2),
                           K=self.K, c2w=self.c2w)


def prepare_source_views(views: SourceViews) -> SourceViewTensors:
    """SourceViews -> the kernel layout (one channels-last copy of the feature maps; the rest are small)."""
    rgb, features = views.rgb, views.features
    if rgb.dim() != 4 or rgb.shape[-1] != 3 or features.dim() != 4 or features.shape[0] != rgb.shape[0]:
        raise ValueError(f"source views: rgb must be [V, H, W, 3] and features [V, F, h, w] with the same V, got "
                         f"{tuple(rgb.shape)} and {tuple(features.shape)}")
    num_views, height, width, _ = rgb.shape
    _, channels, feat_h, feat_w = features.shape
    rot, trans = world_to_camera(views.c2w.float())
    small = lambda t: kernel_ready(t.detach(), torch.float32)  # noqa: E731
    flat = lambda t: kernel_ready(t.detach().reshape(num_views, -1), torch.float32)  # noqa: E731
    return SourceViewTensors(
        rot=small(rot), trans=small(trans), K=small(views.K), origins=small(views.c2w[:, :3, 3]), image=flat(rgb),
        features=flat(features.permute(0, 2, 3, 1)),
        sizes=torch.tensor([width, height, feat_w, feat_h], dtype=torch.float32), c2w=small(views.c2w))


def reference_source_views(points: torch.Tensor, target_origin: torch.Tensor, prepared: SourceViewTensors):
    """The ground truth and fallback: the model's own `sample_source_views` on the same views."""
    return sample_source_views(points, target_origin, prepared.source_views())


def make_source_views(num_views: int, feat_channels: int):
    """IRModule "main"(points [NT, TILE, 3], target [3], rot [V, 3, 3], trans [V, 3], K [V, 3, 3], origins [V, 3],
    image [V, HW3], features [V, hwF], sizes [4]; outputs rgb [V, 3, NT, TILE], feat [V, F, NT, TILE],
    ray_diff [NT, TILE, V, 4], mask [NT, TILE, V]) for the CPU target."""
    import tvm  # lazy: TVM is optional (the reference runs without it)
    from tvm.script import tirx as T  # lazy: TVM is optional

    L, V, F = TILE, num_views, feat_channels
    chunks, remainder = F // 16, F % 16  # 16 channels per vector gather, the rest one at a time
    lanes = T.Ramp(0, 1, L)

    def vec(value):
        return T.Broadcast(T.float32(value), L)

    @T.prim_func
    def main(points_h: T.handle, target: T.Buffer((3,), "float32"), rot: T.Buffer((V, 3, 3), "float32"),
             trans: T.Buffer((V, 3), "float32"), K: T.Buffer((V, 3, 3), "float32"),
             origins: T.Buffer((V, 3), "float32"), image_h: T.handle, features_h: T.handle,
             sizes: T.Buffer((4,), "float32"), rgb_h: T.handle, feat_h: T.handle, diff_h: T.handle,
             mask_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        tiles, image_len, features_len = T.int32(), T.int32(), T.int32()
        points = T.match_buffer(points_h, (tiles, L, 3), "float32")
        image = T.match_buffer(image_h, (V, image_len), "float32")
        features = T.match_buffer(features_h, (V, features_len), "float32")
        rgb = T.match_buffer(rgb_h, (V, 3, tiles, L), "float32")
        feat = T.match_buffer(feat_h, (V, F, tiles, L), "float32")
        ray_diff = T.match_buffer(diff_h, (tiles, L, V, 4), "float32")
        mask = T.match_buffer(mask_h, (tiles, L, V), "float32")
        for task in T.parallel((tiles + TILES_PER_TASK - 1) // TILES_PER_TASK):
            p = T.alloc_buffer((3, L), "float32", scope="local")  # the tile's points, samples as lanes
            to_target = T.alloc_buffer((3, L), "float32", scope="local")
            to_source = T.alloc_buffer((3, L), "float32", scope="local")
            cam = T.alloc_buffer((3, L), "float32", scope="local")
            uv = T.alloc_buffer((2, L), "float32", scope="local")  # pixel coordinates (u, v)
            code = T.alloc_buffer((4, L), "float32", scope="local")
            inside = T.alloc_buffer((L,), "float32", scope="local")
            index = T.alloc_buffer((2, 4, L), "int32", scope="local")  # [image | features, corner, sample]
            weight = T.alloc_buffer((2, 4, L), "float32", scope="local")
            colour = T.alloc_buffer((3, L), "float32", scope="local")  # one view's samples, transposed
            gathered = T.alloc_buffer((F * L,), "float32", scope="local")  # [F, TILE]
            for v, within in T.grid(V, TILES_PER_TASK):  # view-major: one view's outputs (pages) at a time
                if task * TILES_PER_TASK + within < tiles:
                    t = task * TILES_PER_TASK + within
                    for i, a in T.grid(L, 3):
                        p[a, i] = points[t, i, a]
                    # unit vectors from the points to the target camera (F.normalize: x / max(|x|, 1e-12))
                    for a in T.serial(3):
                        to_target[a, lanes] = T.Broadcast(target[a], L) - p[a, lanes]
                    norm_t = T.max(T.sqrt(to_target[0, lanes] * to_target[0, lanes] + to_target[1, lanes]
                                          * to_target[1, lanes] + to_target[2, lanes] * to_target[2, lanes]), vec(1e-12))
                    for a in T.serial(3):
                        to_target[a, lanes] = to_target[a, lanes] / norm_t
                    for a in T.serial(3):
                        cam[a, lanes] = p[0, lanes] * T.Broadcast(rot[v, a, 0], L) + p[1, lanes] \
                            * T.Broadcast(rot[v, a, 1], L) + p[2, lanes] * T.Broadcast(rot[v, a, 2], L) \
                            + T.Broadcast(trans[v, a], L)
                    z = cam[0, lanes] * T.Broadcast(K[v, 2, 0], L) + cam[1, lanes] * T.Broadcast(K[v, 2, 1], L) \
                        + cam[2, lanes] * T.Broadcast(K[v, 2, 2], L)
                    safe_z = T.Select(z >= vec(0.0), T.max(z, vec(_MIN_DEPTH)), T.min(z, vec(-_MIN_DEPTH)))
                    for a in T.serial(2):
                        uv[a, lanes] = T.min(T.max(
                            (cam[0, lanes] * T.Broadcast(K[v, a, 0], L) + cam[1, lanes] * T.Broadcast(K[v, a, 1], L)
                             + cam[2, lanes] * T.Broadcast(K[v, a, 2], L)) / safe_z, vec(-1e6)), vec(1e6))
                    inside[lanes] = T.Select(
                        (cam[2, lanes] > vec(_MIN_DEPTH)) & (uv[0, lanes] >= vec(0.0))
                        & (uv[0, lanes] <= T.Broadcast(sizes[0] - T.float32(1), L)) & (uv[1, lanes] >= vec(0.0))
                        & (uv[1, lanes] <= T.Broadcast(sizes[1] - T.float32(1), L)), vec(1.0), vec(0.0))
                    # bilinear taps as grid_sample takes them (align_corners=True, zeros padding): the normalised grid
                    # 2 u / (W - 1) - 1, clamped to +-3, unnormalised with each map's own size (image, features)
                    grid_x = T.min(T.max(uv[0, lanes] * vec(2.0) / T.Broadcast(T.max(sizes[0] - T.float32(1),
                                                                                     T.float32(1)), L) - vec(1.0),
                                         vec(-3.0)), vec(3.0))
                    grid_y = T.min(T.max(uv[1, lanes] * vec(2.0) / T.Broadcast(T.max(sizes[1] - T.float32(1),
                                                                                     T.float32(1)), L) - vec(1.0),
                                         vec(-3.0)), vec(3.0))
                    for g in T.serial(2):
                        width = T.Broadcast(sizes[2 * g], L)
                        height = T.Broadcast(sizes[2 * g + 1], L)
                        ix = (grid_x + vec(1.0)) * ((width - vec(1.0)) * vec(0.5))
                        iy = (grid_y + vec(1.0)) * ((height - vec(1.0)) * vec(0.5))
                        x0 = T.floor(ix)
                        y0 = T.floor(iy)
                        east = ix - x0
                        south = iy - y0
                        for corner in T.unroll(4):
                            cx = x0 + T.Broadcast(T.Cast("float32", corner % 2), L)
                            cy = y0 + T.Broadcast(T.Cast("float32", corner // 2), L)
                            wx = T.Select(T.Broadcast(corner % 2 == 1, L), east, vec(1.0) - east)
                            wy = T.Select(T.Broadcast(corner // 2 == 1, L), south, vec(1.0) - south)
                            weight[g, corner, lanes] = T.Select(
                                (cx >= vec(0.0)) & (cx <= width - vec(1.0)) & (cy >= vec(0.0)) & (cy <= height - vec(1.0)),
                                wy * wx, vec(0.0))
                            index[g, corner, lanes] = T.Cast(f"int32x{L}", T.min(T.max(cy, vec(0.0)), height - vec(1.0))
                                                             * width + T.min(T.max(cx, vec(0.0)), width - vec(1.0)))
                    # the relative view code (projector.relative_direction_code)
                    for a in T.serial(3):
                        to_source[a, lanes] = T.Broadcast(origins[v, a], L) - p[a, lanes]
                    norm_s = T.max(T.sqrt(to_source[0, lanes] * to_source[0, lanes] + to_source[1, lanes]
                                          * to_source[1, lanes] + to_source[2, lanes] * to_source[2, lanes]), vec(1e-12))
                    for a in T.serial(3):
                        to_source[a, lanes] = to_source[a, lanes] / norm_s
                    for a in T.serial(3):
                        code[a, lanes] = to_target[a, lanes] - to_source[a, lanes]
                    norm_d = T.max(T.sqrt(code[0, lanes] * code[0, lanes] + code[1, lanes] * code[1, lanes]
                                          + code[2, lanes] * code[2, lanes]), vec(1e-6))
                    for a in T.serial(3):
                        code[a, lanes] = code[a, lanes] / norm_d
                    code[3, lanes] = to_target[0, lanes] * to_source[0, lanes] + to_target[1, lanes] \
                        * to_source[1, lanes] + to_target[2, lanes] * to_source[2, lanes]
                    for i in T.serial(L):
                        mask[t, i, v] = inside[i]
                        for a in T.serial(4):
                            ray_diff[t, i, v, a] = code[a, i]
                        for c in T.serial(3):
                            colour[c, i] = weight[0, 0, i] * image[v, index[0, 0, i] * 3 + c] \
                                + weight[0, 1, i] * image[v, index[0, 1, i] * 3 + c] \
                                + weight[0, 2, i] * image[v, index[0, 2, i] * 3 + c] \
                                + weight[0, 3, i] * image[v, index[0, 3, i] * 3 + c]
                        for chunk in T.serial(chunks):
                            gathered[T.Ramp(chunk * 16 * L + i, L, 16)] = T.Broadcast(weight[1, 0, i], 16) \
                                * features[v, T.Ramp(index[1, 0, i] * F + chunk * 16, 1, 16)] \
                                + T.Broadcast(weight[1, 1, i], 16) \
                                * features[v, T.Ramp(index[1, 1, i] * F + chunk * 16, 1, 16)] \
                                + T.Broadcast(weight[1, 2, i], 16) \
                                * features[v, T.Ramp(index[1, 2, i] * F + chunk * 16, 1, 16)] \
                                + T.Broadcast(weight[1, 3, i], 16) \
                                * features[v, T.Ramp(index[1, 3, i] * F + chunk * 16, 1, 16)]
                        for c in T.serial(remainder):
                            gathered[(chunks * 16 + c) * L + i] = \
                                weight[1, 0, i] * features[v, index[1, 0, i] * F + chunks * 16 + c] \
                                + weight[1, 1, i] * features[v, index[1, 1, i] * F + chunks * 16 + c] \
                                + weight[1, 2, i] * features[v, index[1, 2, i] * F + chunks * 16 + c] \
                                + weight[1, 3, i] * features[v, index[1, 3, i] * F + chunks * 16 + c]
                    # out of the transposition buffers a whole cache line per channel: scattered 4-byte stores
                    # straight into [V, F, N] (N * 4 bytes apart, all in one L1 set) ran 3x slower
                    for c in T.serial(3):
                        rgb[v, c, t, lanes] = colour[c, lanes]
                    for c in T.serial(F):
                        feat[v, c, t, lanes] = gathered[T.Ramp(c * L, 1, L)]

    return tvm.IRModule({"main": main})


def source_views(points: torch.Tensor, target_origin: torch.Tensor, prepared: SourceViewTensors):
    """points [R, S, 3], target_origin [3] -> (rgb [V, 3, R, S], feat [V, F, R, S], ray_diff [R, S, V, 4],
    mask [R, S, V, 1]) fp32, as `sample_source_views` on the views `prepared` was made from. The reference runs
    when gradients are needed or no kernel can be had (one warning)."""
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"source_views: points must be [rays, samples, 3], got {tuple(points.shape)}")
    if points.device.type != "cpu":
        raise ValueError(f"source_views: the kernel runs on CPU, got points on {points.device}")
    if tuple(target_origin.shape) != (3,):
        raise ValueError(f"source_views: target_origin must be [3], got {tuple(target_origin.shape)}")
    if needs_grad(points, target_origin):
        note_kernel("source_views", "reference")
        return reference_source_views(points, target_origin, prepared)
    V, F = prepared.num_views, prepared.feat_channels
    kernel = get_kernel("source_views", {"views": V, "feat": F, "tile": TILE}, points.device,
                        lambda target: make_source_views(V, F))
    if kernel is None:
        return reference_source_views(points, target_origin, prepared)
    rays, samples, _ = points.shape
    tokens = rays * samples
    padded = -(-tokens // TILE) * TILE
    flat = points.reshape(tokens, 3).float()
    if padded != tokens:  # zero points: harmless (behind every camera or not, their outputs are cut off)
        flat = torch.cat([flat, flat.new_zeros(padded - tokens, 3)])
    tiles = padded // TILE
    rgb, feat = torch.empty(V, 3, padded), torch.empty(V, F, padded)
    ray_diff, mask = torch.empty(padded, V, 4), torch.empty(padded, V)
    if tiles:
        kernel(kernel_ready(flat).view(tiles, TILE, 3), kernel_ready(target_origin.detach(), torch.float32),
               *prepared.kernel_arguments(), rgb.view(V, 3, tiles, TILE), feat.view(V, F, tiles, TILE),
               ray_diff.view(tiles, TILE, V, 4), mask.view(tiles, TILE, V))
    if padded != tokens:
        rgb, feat, ray_diff, mask = rgb[..., :tokens], feat[..., :tokens], ray_diff[:tokens], mask[:tokens]
    return (rgb.reshape(V, 3, rays, samples), feat.reshape(V, F, rays, samples),
            ray_diff.reshape(rays, samples, V, 4), mask.reshape(rays, samples, V, 1))
