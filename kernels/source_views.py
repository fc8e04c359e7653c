"""What the source views see at the samples, in one CPU kernel: projection, bilinear gathers, mask, view codes,
and (source_front_end) GNT's front end on top, so the gathered rows never reach memory.

`gnt_shiftadd.models.projector.sample_source_views` (the reference) projects every sample into every source view
with two batched matrix products, runs `F.grid_sample` twice (RGB and CNN features, NCHW maps, one channel
plane after the other) and builds the 4-d relative view code from half a dozen elementwise ops over
[R, S, V, 3]: 562-698 ms of a fern frame in the PyTorch rows of results/kernels_blend_cpu.json, the same for
dense and ShiftAdd models. Here, per tile of 16 samples and per view:

    cam  = R^T p + t,  (z u, z v, z) = K cam                  16 samples as vector lanes
    mask = z > 1e-6 and (u, v) inside the image                [N, V]
    taps = 4 bilinear corners and weights (grid_sample's zeros padding, align_corners=True), for the image
           and for the feature map (its own size, same extent)
    rgb  = sum_taps w * image[tap]                              [3, TILE]   transposed in L1: samples as lanes
    feat = sum_taps w * features_channels_last[tap, :]          [F, TILE]
    ray_diff = (unit(to_target - to_source), to_target . to_source)   [N, V, 4]

source_views writes rgb and feat out in grid_sample's [V, C, N] layout; source_front_end instead runs the
per-view MLP on them (3 + F -> H -> C) and the masked max-pool over the views, and writes only the features
[N, V, C], the first query [N, C] and the colours [N, V, 3]. Its second layer may be an 8-bit integer shift layer
with a calibrated per-tensor scale (variant l: rounded into fixed point in registers, VNNI dot products).
The feature gathers run vector-over-channels on a channels-last copy of the maps (made once per set of source
views and reused by every chunk); a vector-over-samples gather would be 16 scalar loads per vector on this CPU.
N is padded to whole tiles by the wrapper; the tile count is symbolic, and so are the image and map sizes.
CPU (llvm) only: on CUDA the reference's grid_sample is already a native kernel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from gnt_shiftadd.models.projector import SourceViews, sample_source_views, world_to_camera
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, needs_grad, note_kernel
from kernels.int_shift import _blocks_per_pass, _KernelParts
from kernels.view_features import ViewFeatureWeights, reference_view_features

__all__ = ["TILE", "SourceViewTensors", "prepare_source_views", "fold_feature_block", "make_source_views", "source_views",
           "reference_source_views", "make_source_front_end", "source_front_end", "reference_source_front_end"]

TILE = 16  # samples per tile: the vector lanes of the projection and tap arithmetic
TILES_PER_TASK = 16  # tiles per parallel task: its scratch buffers are allocated once per task
_MIN_DEPTH = 1e-6  # as the reference (projector._MIN_DEPTH)
_NEG = -3.0e38  # below any finite feature (the max over no visible view stays here and becomes 0)
_INT_SAMPLES = 8  # samples per micro-tile of the integer second layer (x C/16 accumulators, all in registers)


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


def _tile_parts(num_views: int, feat_channels: int, sample_rows: bool = False):
    """The TVMScript pieces both kernels are made of (parsed into the enclosing kernel):

    load_tile(points, target, t, p, to_target): the tile's 16 samples as lanes, and their unit vectors to the target
        camera;
    sample_view(t, v, inputs..., scratch..., colour, gathered, mask, ray_diff): one source view for the tile:
        projection, mask, bilinear taps, colour [3, TILE] and features [F * TILE] (transposed: samples as lanes),
        and the view code, writing mask[t, :, v] and ray_diff[t, :, v, :]. sample_rows: the features as [TILE, F]
        rows instead (no transposition: what the folded front end adds to its colour block per sample)."""
    from tvm.script import tirx as T  # lazy: TVM is optional (the reference runs without it)

    L, F = TILE, feat_channels
    chunks, remainder = F // 16, F % 16  # 16 channels per vector gather, the rest one at a time
    if sample_rows:  # where sample i's channels go in `gathered` (chosen here: a macro would parse a conditional)
        vector_slot = lambda i, chunk: T.Ramp(i * F + chunk * 16, 1, 16)  # noqa: E731
        scalar_slot = lambda i, c: i * F + c  # noqa: E731
    else:
        vector_slot = lambda i, chunk: T.Ramp(chunk * 16 * L + i, L, 16)  # noqa: E731
        scalar_slot = lambda i, c: c * L + i  # noqa: E731
    lanes = T.Ramp(0, 1, L)

    def vec(value):
        return T.Broadcast(T.float32(value), L)

    @T.macro
    def load_tile(points, target, t, p, to_target):
        for i, a in T.grid(L, 3):
            p[a, i] = points[t, i, a]
        # unit vectors from the points to the target camera (F.normalize: x / max(|x|, 1e-12))
        for a in T.serial(3):
            to_target[a, lanes] = T.Broadcast(target[a], L) - p[a, lanes]
        norm_t = T.max(T.sqrt(to_target[0, lanes] * to_target[0, lanes] + to_target[1, lanes]
                              * to_target[1, lanes] + to_target[2, lanes] * to_target[2, lanes]), vec(1e-12))
        for a in T.serial(3):
            to_target[a, lanes] = to_target[a, lanes] / norm_t

    @T.macro
    def sample_view(t, v, rot, trans, K, origins, image, features, sizes, p, to_target, to_source, cam, uv, code,
                    inside, index, weight, colour, gathered, mask, ray_diff):
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
        grid_x = T.min(T.max(uv[0, lanes] * vec(2.0) / T.Broadcast(T.max(sizes[0] - T.float32(1), T.float32(1)), L)
                             - vec(1.0), vec(-3.0)), vec(3.0))
        grid_y = T.min(T.max(uv[1, lanes] * vec(2.0) / T.Broadcast(T.max(sizes[1] - T.float32(1), T.float32(1)), L)
                             - vec(1.0), vec(-3.0)), vec(3.0))
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
                gathered[vector_slot(i, chunk)] = \
                    T.Broadcast(weight[1, 0, i], 16) * features[v, T.Ramp(index[1, 0, i] * F + chunk * 16, 1, 16)] \
                    + T.Broadcast(weight[1, 1, i], 16) * features[v, T.Ramp(index[1, 1, i] * F + chunk * 16, 1, 16)] \
                    + T.Broadcast(weight[1, 2, i], 16) * features[v, T.Ramp(index[1, 2, i] * F + chunk * 16, 1, 16)] \
                    + T.Broadcast(weight[1, 3, i], 16) * features[v, T.Ramp(index[1, 3, i] * F + chunk * 16, 1, 16)]
            for c in T.serial(remainder):
                gathered[scalar_slot(i, chunks * 16 + c)] = \
                    weight[1, 0, i] * features[v, index[1, 0, i] * F + chunks * 16 + c] \
                    + weight[1, 1, i] * features[v, index[1, 1, i] * F + chunks * 16 + c] \
                    + weight[1, 2, i] * features[v, index[1, 2, i] * F + chunks * 16 + c] \
                    + weight[1, 3, i] * features[v, index[1, 3, i] * F + chunks * 16 + c]

    return load_tile, sample_view


def make_source_views(num_views: int, feat_channels: int):
    """IRModule "main"(points [NT, TILE, 3], target [3], rot [V, 3, 3], trans [V, 3], K [V, 3, 3], origins [V, 3],
    image [V, HW3], features [V, hwF], sizes [4]; outputs rgb [V, 3, NT, TILE], feat [V, F, NT, TILE],
    ray_diff [NT, TILE, V, 4], mask [NT, TILE, V]) for the CPU target."""
    import tvm  # lazy: TVM is optional (the reference runs without it)
    from tvm.script import tirx as T  # lazy: TVM is optional

    L, V, F = TILE, num_views, feat_channels
    load_tile, sample_view = _tile_parts(V, F)
    lanes = T.Ramp(0, 1, L)

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
                    load_tile(points, target, task * TILES_PER_TASK + within, p, to_target)
                    sample_view(task * TILES_PER_TASK + within, v, rot, trans, K, origins, image, features, sizes, p,
                                to_target, to_source, cam, uv, code, inside, index, weight, colour, gathered, mask,
                                ray_diff)
                    # out of the transposition buffers a whole cache line per channel: scattered 4-byte stores
                    # straight into [V, F, N] (N * 4 bytes apart) would all fall in one L1 set
                    for c in T.serial(3):
                        rgb[v, c, task * TILES_PER_TASK + within, lanes] = colour[c, lanes]
                    for c in T.serial(F):
                        feat[v, c, task * TILES_PER_TASK + within, lanes] = gathered[T.Ramp(c * L, 1, L)]

    return tvm.IRModule({"main": main})


def make_source_front_end(num_views: int, feat_channels: int, hidden: int, channels: int, folded: bool = False,
                          integer: bool = False):
    """The source views and GNT's front end in one kernel: sample_view for every view of a tile, then, still in L1,
    the per-view MLP (colour and features -> hidden -> channels) and the masked max-pool over the visible views.
    IRModule "main"(points, target, rot, trans, K, origins, image, features, sizes (as make_source_views),
    w1 [3 + F, H], b1 [H], w2 [H, C], b2 [C]; outputs features [NT, TILE, V, C], q0 [NT, TILE, C],
    colors [NT, TILE, V, 3], ray_diff [NT, TILE, V, 4], mask [NT, TILE, V]). C must be a multiple of 16.

    The first layer runs with the 16 samples as vector lanes (the gathered rows are already transposed that way),
    8 hidden units at a time in registers; the second with the channels as lanes, 4 samples x C/16 registers at a
    time; both are unrolled while the kernel is parsed, so their accumulators are registers.

    folded (fold_feature_block): the feature maps carry the first layer's feature block already, so the kernel
    gathers H channels and its first layer is b1 + the colour block + the gathered row; w1 is [3, H] (F = 0). With
    H a multiple of 16 the gathered rows are not transposed: the first layer runs per sample with the channels as
    lanes, where they were summed.

    integer (folded, H a multiple of 16; ShiftAdd variants with shiftadd.front_end: shift): the second layer is an
    8-bit integer shift layer with a calibrated per-tensor scale. The first layer's ReLU outputs are rounded straight
    into its fixed point (a multiply, a clamp and a vcvtps2dq: no fp32 hidden row in memory) and the layer runs on
    VNNI (kernels/int_shift.py's dot products, 8 samples x C/16 accumulators), rescaled per output channel; its
    arguments replace w2 [H, C], b2 [C] by the IntShiftWeights' packed, compensation, out_scale, bias and absmax."""
    import tvm  # lazy: TVM is optional (the reference runs without it)
    from tvm.script import tirx as T  # lazy: TVM is optional

    L, V, F, H, C = TILE, num_views, feat_channels, hidden, channels
    if C % 16:
        raise ValueError(f"source front end kernel: channels must be a multiple of 16, got {C}")
    if folded and F:
        raise ValueError("source front end kernel: folded weights have no feature rows (F = 0)")
    per_sample = folded and H % 16 == 0  # the gathered rows stay per sample (channels as lanes): no transposition
    if integer and not per_sample:
        raise ValueError(f"source front end kernel: the integer second layer needs folded weights and a hidden width "
                         f"that is a multiple of 16, got folded={folded}, H={H}")
    load_tile, sample_view = _tile_parts(V, H if folded else F, sample_rows=per_sample)
    gathered_channels = H if folded else F
    lanes = T.Ramp(0, 1, L)
    neg = T.float32(_NEG)

    def first_layer(colour, gathered, w1, b1, act):
        """act[h * TILE + i] = relu(b1[h] + sum_c w1[c, h] x_c[i]) for the tile's samples (lanes)."""
        for start in range(0, H, 8):
            units = range(start, min(start + 8, H))
            acc = {h: T.bind(T.Broadcast(b1[h], L)) for h in units}
            if folded:  # the gathered row is the feature block's output already
                acc = {h: T.bind(acc[h] + gathered[T.Ramp(h * L, 1, L)]) for h in units}
            for c in range(3 + F):
                x = T.bind(colour[c, lanes] if c < 3 else gathered[T.Ramp((c - 3) * L, 1, L)])
                for h in units:
                    acc[h] = T.bind(acc[h] + T.Broadcast(w1[c, h], L) * x)
            for h in units:
                T.buffer_store(act, T.max(acc[h], T.Broadcast(T.float32(0), L)), [T.Ramp(h * L, 1, L)])

    def first_layer_rows(colour, gathered, w1, b1, act):
        """act[i * H + h] = relu(b1[h] + sum_c<3 w1[c, h] colour[c, i] + gathered[i * H + h]) (folded, channels as
        lanes: the gathered rows as they were summed, the colours broadcast)."""
        for block in range(H // 16):
            here = T.Ramp(block * 16, 1, 16)
            bias, w_r, w_g, w_b = (T.bind(b1[here]), T.bind(w1[0, here]), T.bind(w1[1, here]), T.bind(w1[2, here]))
            for i in range(L):
                row = T.Ramp(i * H + block * 16, 1, 16)
                T.buffer_store(act, T.max(bias + T.Broadcast(colour[0, i], 16) * w_r + T.Broadcast(colour[1, i], 16)
                                          * w_g + T.Broadcast(colour[2, i], 16) * w_b + gathered[row],
                                          T.Broadcast(T.float32(0), 16)), [row])

    layer_one = first_layer_rows if per_sample else first_layer  # (chosen here: the kernel body would parse a conditional)

    def second_layer(act, w2, b2, t, v, out, peak, inside):
        """out[t, i, v, :] = b2 + sum_r act[r, i] w2[r, :], and the running max over visible views in `peak`."""
        blocks = C // 16
        for first in range(0, L, 4):
            samples = range(first, first + 4)
            acc = {(i, b): T.bind(b2[T.Ramp(b * 16, 1, 16)]) for i in samples for b in range(blocks)}
            for r in range(H):
                rows = [T.bind(w2[r, T.Ramp(b * 16, 1, 16)]) for b in range(blocks)]
                for i in samples:
                    a = T.bind(T.Broadcast(act[i * H + r] if per_sample else act[r * L + i], 16))
                    for b in range(blocks):
                        acc[i, b] = T.bind(acc[i, b] + a * rows[b])
            for (i, b), value in acc.items():
                write_features(out, peak, inside, t, i, v, b, value)

    def write_features(out, peak, inside, t, i, v, block, value):
        """Channels block*16.. of sample i's features from view v: to out[t, i, v] and into the running max over
        the visible views."""
        T.buffer_store(out, value, [t, i, v, T.Ramp(block * 16, 1, 16)])
        here = T.Ramp(i * C + block * 16, 1, 16)
        T.buffer_store(peak, T.Select(T.Broadcast(inside[i] > T.float32(0), 16), T.max(peak[here], value),
                                      peak[here]), [here])

    int_parts = _KernelParts(8, _INT_SAMPLES)  # the integer second layer: 8 samples x C/16 accumulators at a time
    int_blocks = _blocks_per_pass(C // 16, 2)

    def first_layer_fixed(colour, gathered, w1, b1, xq, inv):
        """xq[i, h] = the fixed point of relu(b1[h] + sum_c<3 w1[c, h] colour[c, i] + gathered[i * H + h]) with the
        second layer's calibrated scale inv (as first_layer_rows, then rounded: the hidden units never reach memory
        as fp32)."""
        for block in range(H // 16):
            here = T.Ramp(block * 16, 1, 16)
            bias, w_r, w_g, w_b = (T.bind(b1[here]), T.bind(w1[0, here]), T.bind(w1[1, here]), T.bind(w1[2, here]))
            for i in range(L):
                value = bias + T.Broadcast(colour[0, i], 16) * w_r + T.Broadcast(colour[1, i], 16) * w_g \
                    + T.Broadcast(colour[2, i], 16) * w_b + gathered[T.Ramp(i * H + block * 16, 1, 16)]
                T.buffer_store(xq, int_parts.fixed_point(int_parts.relu(value), inv, True), [i, here])

    def second_layer_int(xq, scale, packed, compensation, out_scale, bias, t, v, out, peak, inside):
        """out[t, i, v, :] = the integer layer on xq[i] (kernels/int_shift.py's dot products and epilogue), and the
        running max over visible views in `peak`; _INT_SAMPLES samples at a time."""
        for first in range(0, L, _INT_SAMPLES):
            def word(i, kg, first=first):
                return T.reinterpret("int32", xq[first + i, T.Ramp(kg * 4, 1, 4)])

            def store(i, block, value, first=first):
                write_features(out, peak, inside, t, first + i, v, block, value)

            for p in range(C // 16 // int_blocks):
                int_parts.dot_products(xq, packed, compensation, out_scale, bias, scale, p, H, int_blocks, store, word)

    @T.macro
    def tiles_of_task(task, tiles, points, target, rot, trans, K, origins, image, features, sizes, out, q0, colors,
                      ray_diff, mask, embed):
        """The task's tiles: each view sampled into L1 (sample_view), then embed(colour, gathered, t, v, peak,
        inside) runs the per-view MLP on it, writing out[t, :, v] and the running max in peak; then q0."""
        p = T.alloc_buffer((3, L), "float32", scope="local")
        to_target = T.alloc_buffer((3, L), "float32", scope="local")
        to_source = T.alloc_buffer((3, L), "float32", scope="local")
        cam = T.alloc_buffer((3, L), "float32", scope="local")
        uv = T.alloc_buffer((2, L), "float32", scope="local")
        code = T.alloc_buffer((4, L), "float32", scope="local")
        inside = T.alloc_buffer((L,), "float32", scope="local")
        index = T.alloc_buffer((2, 4, L), "int32", scope="local")
        weight = T.alloc_buffer((2, 4, L), "float32", scope="local")
        colour = T.alloc_buffer((3, L), "float32", scope="local")
        gathered = T.alloc_buffer((gathered_channels * L,), "float32", scope="local")
        peak = T.alloc_buffer((L * C,), "float32", scope="local")  # [TILE, C]: max over the visible views
        for within in T.serial(TILES_PER_TASK):
            if task * TILES_PER_TASK + within < tiles:
                load_tile(points, target, task * TILES_PER_TASK + within, p, to_target)
                for k in T.serial(L * C // 16):
                    peak[T.Ramp(k * 16, 1, 16)] = T.Broadcast(neg, 16)
                for v in T.serial(V):
                    sample_view(task * TILES_PER_TASK + within, v, rot, trans, K, origins, image, features, sizes,
                                p, to_target, to_source, cam, uv, code, inside, index, weight, colour, gathered,
                                mask, ray_diff)
                    for i, c in T.grid(L, 3):
                        colors[task * TILES_PER_TASK + within, i, v, c] = colour[c, i]
                    embed(colour, gathered, task * TILES_PER_TASK + within, v, peak, inside)
                for i, k in T.grid(L, C // 16):
                    q0[task * TILES_PER_TASK + within, i, T.Ramp(k * 16, 1, 16)] = T.Select(
                        peak[T.Ramp(i * C + k * 16, 1, 16)] > T.Broadcast(neg, 16),
                        peak[T.Ramp(i * C + k * 16, 1, 16)], T.Broadcast(T.float32(0), 16))

    @T.macro
    def body(points_h, target, rot, trans, K, origins, image_h, features_h, sizes, out_h, q0_h, colors_h, diff_h,
             mask_h, task_embedding):
        """Both kernels' body: the buffers, and per parallel task task_embedding(out), which sets up the task's
        scratch and returns its embed(colour, gathered, t, v, peak, inside) (fp32_task or integer_task)."""
        tiles, image_len, features_len = T.int32(), T.int32(), T.int32()
        points = T.match_buffer(points_h, (tiles, L, 3), "float32")
        image = T.match_buffer(image_h, (V, image_len), "float32")
        features = T.match_buffer(features_h, (V, features_len), "float32")
        out = T.match_buffer(out_h, (tiles, L, V, C), "float32")
        q0 = T.match_buffer(q0_h, (tiles, L, C), "float32")
        colors = T.match_buffer(colors_h, (tiles, L, V, 3), "float32")
        ray_diff = T.match_buffer(diff_h, (tiles, L, V, 4), "float32")
        mask = T.match_buffer(mask_h, (tiles, L, V), "float32")
        for task in T.parallel((tiles + TILES_PER_TASK - 1) // TILES_PER_TASK):
            tiles_of_task(task, tiles, points, target, rot, trans, K, origins, image, features, sizes, out, q0,
                          colors, ray_diff, mask, task_embedding(out))

    def fp32_task(w1, b1, w2, b2):
        """task_embedding of the fp32 MLP: the task's [H, TILE] first-layer buffer, then per view both layers."""
        def embedding(out):
            act = T.alloc_buffer((H * L,), "float32", scope="local")

            def embed(colour, gathered, t, v, peak, inside):
                layer_one(colour, gathered, w1, b1, act)
                second_layer(act, w2, b2, t, v, out, peak, inside)
            return embed
        return embedding

    def integer_task(w1, b1, packed, compensation, out_scale, bias, absmax):
        """task_embedding with the integer second layer: the task's fixed-point hidden units and the calibrated
        scale (one division each per task), then per view the first layer rounded into xq and the VNNI layer."""
        def embedding(out):
            xq = T.alloc_buffer((L, H), "uint8", scope="local")  # the hidden units in fixed point (+128)
            scale = T.alloc_buffer((_INT_SAMPLES,), "float32", scope="local")
            inv, step = (T.bind(value) for value in int_parts.calibration(absmax[0]))
            for i in range(_INT_SAMPLES):
                T.buffer_store(scale, step, [i])

            def embed(colour, gathered, t, v, peak, inside):
                first_layer_fixed(colour, gathered, w1, b1, xq, inv)
                second_layer_int(xq, scale, packed, compensation, out_scale, bias, t, v, out, peak, inside)
            return embed
        return embedding

    if not integer:
        @T.prim_func
        def main(points_h: T.handle, target: T.Buffer((3,), "float32"), rot: T.Buffer((V, 3, 3), "float32"),
                 trans: T.Buffer((V, 3), "float32"), K: T.Buffer((V, 3, 3), "float32"),
                 origins: T.Buffer((V, 3), "float32"), image_h: T.handle, features_h: T.handle,
                 sizes: T.Buffer((4,), "float32"), w1: T.Buffer((3 + F, H), "float32"),
                 b1: T.Buffer((H,), "float32"), w2: T.Buffer((H, C), "float32"), b2: T.Buffer((C,), "float32"),
                 out_h: T.handle, q0_h: T.handle, colors_h: T.handle, diff_h: T.handle, mask_h: T.handle):
            T.func_attr({"global_symbol": "main", "tir.noalias": True})
            body(points_h, target, rot, trans, K, origins, image_h, features_h, sizes, out_h, q0_h, colors_h, diff_h,
                 mask_h, fp32_task(w1, b1, w2, b2))
    else:
        @T.prim_func
        def main(points_h: T.handle, target: T.Buffer((3,), "float32"), rot: T.Buffer((V, 3, 3), "float32"),
                 trans: T.Buffer((V, 3), "float32"), K: T.Buffer((V, 3, 3), "float32"),
                 origins: T.Buffer((V, 3), "float32"), image_h: T.handle, features_h: T.handle,
                 sizes: T.Buffer((4,), "float32"), w1: T.Buffer((3, H), "float32"), b1: T.Buffer((H,), "float32"),
                 packed: T.Buffer((C // 16, H // 4, 64), "int8"), compensation: T.Buffer((C,), "int32"),
                 out_scale: T.Buffer((C,), "float32"), bias: T.Buffer((C,), "float32"),
                 absmax: T.Buffer((1,), "float32"), out_h: T.handle, q0_h: T.handle, colors_h: T.handle,
                 diff_h: T.handle, mask_h: T.handle):
            T.func_attr({"global_symbol": "main", "tir.noalias": True})
            body(points_h, target, rot, trans, K, origins, image_h, features_h, sizes, out_h, q0_h, colors_h, diff_h,
                 mask_h, integer_task(w1, b1, packed, compensation, out_scale, bias, absmax))

    return tvm.IRModule({"main": main})


def _check_points(points: torch.Tensor, target_origin: torch.Tensor, name: str) -> None:
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"{name}: points must be [rays, samples, 3], got {tuple(points.shape)}")
    if points.device.type != "cpu":
        raise ValueError(f"{name}: the kernel runs on CPU, got points on {points.device}")
    if tuple(target_origin.shape) != (3,):
        raise ValueError(f"{name}: target_origin must be [3], got {tuple(target_origin.shape)}")


def _padded_points(points: torch.Tensor) -> tuple[torch.Tensor, int]:
    """points [R, S, 3] -> (kernel-ready [NT * TILE, 3] with zero points after the real ones, NT). Zero points are
    harmless: whatever they sample is cut off."""
    tokens = points.shape[0] * points.shape[1]
    tiles = -(-tokens // TILE)
    flat = points.reshape(tokens, 3).float()
    if tiles * TILE != tokens:
        flat = torch.cat([flat, flat.new_zeros(tiles * TILE - tokens, 3)])
    return kernel_ready(flat), tiles


def source_views(points: torch.Tensor, target_origin: torch.Tensor, prepared: SourceViewTensors):
    """points [R, S, 3], target_origin [3] -> (rgb [V, 3, R, S], feat [V, F, R, S], ray_diff [R, S, V, 4],
    mask [R, S, V, 1]) fp32, as `sample_source_views` on the views `prepared` was made from. The reference runs
    when gradients are needed or no kernel can be had (one warning)."""
    _check_points(points, target_origin, "source_views")
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
    flat, tiles = _padded_points(points)
    padded = tiles * TILE
    rgb, feat = torch.empty(V, 3, padded), torch.empty(V, F, padded)
    ray_diff, mask = torch.empty(padded, V, 4), torch.empty(padded, V)
    if tiles:
        kernel(flat.view(tiles, TILE, 3), kernel_ready(target_origin.detach(), torch.float32),
               *prepared.kernel_arguments(), rgb.view(V, 3, tiles, TILE), feat.view(V, F, tiles, TILE),
               ray_diff.view(tiles, TILE, V, 4), mask.view(tiles, TILE, V))
    if padded != tokens:
        rgb, feat, ray_diff, mask = rgb[..., :tokens], feat[..., :tokens], ray_diff[:tokens], mask[:tokens]
    return (rgb.reshape(V, 3, rays, samples), feat.reshape(V, F, rays, samples),
            ray_diff.reshape(rays, samples, V, 4), mask.reshape(rays, samples, V, 1))


def fold_feature_block(prepared: SourceViewTensors, weights: ViewFeatureWeights
                       ) -> tuple[SourceViewTensors, ViewFeatureWeights]:
    """The front end's first layer applied to the source feature maps instead of to every gathered row.

    Its feature block is linear and so is bilinear sampling (grid_sample's zero padding included: a missing tap is
    0 either way), so W1f sample(feat) = sample(W1f feat). Once per set of source views that is V h w F H
    multiply-accumulates (18 M at fern's 47 x 63 maps); per gathered row it was F H each (a 2048-ray chunk has
    295 k rows: 302 M), about half of the front end's arithmetic. The kernel then gathers H channels instead of F
    (the same at GNT's widths, F = H = 32). fp32 rounding aside, the same values.
    -> (views whose feature maps are W1f feat [V, h*w*H] channels last, weights without feature rows)."""
    feat_channels, hidden, _ = weights.shapes
    if weights.folded or prepared.feat_channels != feat_channels:
        raise ValueError(f"fold_feature_block: weights for {feat_channels} feature channels "
                         f"{'(folded already) ' if weights.folded else ''}do not fit maps of {prepared.feat_channels}")
    maps = prepared.features.view(prepared.num_views, -1, feat_channels) @ weights.w1_feat  # [V, h*w, H]
    folded_views = dataclasses.replace(prepared, features=kernel_ready(maps.reshape(prepared.num_views, -1),
                                                                        torch.float32))
    return folded_views, ViewFeatureWeights(weights.w1_rgb, weights.w1_feat[:0], weights.b1, weights.w2, weights.b2,
                                            weights.second)


def reference_source_front_end(points: torch.Tensor, target_origin: torch.Tensor, prepared: SourceViewTensors,
                               weights: ViewFeatureWeights):
    """Ground truth of `source_front_end`: the model's sample_source_views, then its front end (the view-features
    reference), and the colours in the transformer's layout."""
    rgb, feat, ray_diff, mask = reference_source_views(points, target_origin, prepared)
    num_views, _, rays, samples = rgb.shape
    features, q0 = reference_view_features(rgb.reshape(num_views, 3, -1), feat.reshape(num_views, feat.shape[1], -1),
                                           mask.reshape(-1, num_views), weights)
    return (features.reshape(rays, samples, num_views, -1), q0.reshape(rays, samples, -1), rgb.permute(2, 3, 0, 1),
            ray_diff, mask)


def source_front_end(points: torch.Tensor, target_origin: torch.Tensor, prepared: SourceViewTensors,
                     weights: ViewFeatureWeights):
    """points [R, S, 3], target_origin [3] -> (features [R, S, V, C], q0 [R, S, C], colors [R, S, V, 3],
    ray_diff [R, S, V, 4], mask [R, S, V, 1]) fp32: the source views sampled and embedded by GNT's front end
    (`weights`: its rgbfeat_fc1/fc2) in one kernel, without the [V, 3 + F, N] gathered rows ever reaching memory.
    The reference runs when gradients are needed or no kernel can be had (one warning)."""
    _check_points(points, target_origin, "source_front_end")
    feat_channels, hidden, channels = weights.shapes
    V, F = prepared.num_views, prepared.feat_channels
    if (hidden if weights.folded else feat_channels) != F:
        raise ValueError(f"source_front_end: the front end takes {hidden if weights.folded else feat_channels} "
                         f"{'folded (fold_feature_block) ' if weights.folded else ''}feature channels, the source "
                         f"views have {F}")
    if needs_grad(points, target_origin):
        note_kernel("source_front_end", "reference")
        return reference_source_front_end(points, target_origin, prepared, weights)
    folded, integer = weights.folded, weights.second is not None
    if integer and not (folded and hidden % 16 == 0):
        raise ValueError(f"source_front_end: an integer second layer needs folded weights (fold_feature_block) and a "
                         f"hidden width that is a multiple of 16, got folded={folded}, H={hidden}")
    key = {"views": V, "feat": feat_channels, "hidden": hidden, "channels": channels, "tile": TILE, "folded": folded}
    if integer:  # (the fp32 kernel's key is unchanged: its cached builds stay valid)
        key["integer"] = True
    kernel = get_kernel("source_front_end", key, points.device,
                        lambda target: make_source_front_end(V, feat_channels, hidden, channels, folded, integer))
    if kernel is None:
        return reference_source_front_end(points, target_origin, prepared, weights)
    rays, samples, _ = points.shape
    tokens = rays * samples
    flat, tiles = _padded_points(points)
    padded = tiles * TILE
    features, q0 = torch.empty(padded, V, channels), torch.empty(padded, channels)
    colors, ray_diff, mask = torch.empty(padded, V, 3), torch.empty(padded, V, 4), torch.empty(padded, V)
    if tiles:
        w1 = torch.cat([weights.w1_rgb, weights.w1_feat])
        second = weights.second.tensors() if integer else (weights.w2, weights.b2)
        kernel(flat.view(tiles, TILE, 3), kernel_ready(target_origin.detach(), torch.float32),
               *prepared.kernel_arguments(), w1, weights.b1, *second,
               features.view(tiles, TILE, V, channels), q0.view(tiles, TILE, channels),
               colors.view(tiles, TILE, V, 3), ray_diff.view(tiles, TILE, V, 4), mask.view(tiles, TILE, V))
    return (features[:tokens].reshape(rays, samples, V, channels), q0[:tokens].reshape(rays, samples, channels),
            colors[:tokens].reshape(rays, samples, V, 3), ray_diff[:tokens].reshape(rays, samples, V, 4),
            mask[:tokens].reshape(rays, samples, V, 1))
