"""GNT: Generalizable NeRF Transformer (Varma, Wang et al., ICLR 2023).

A CNN encodes the source views once per target; each target ray's samples are projected into every source view,
and `trans_depth` pairs of (view transformer, ray transformer) turn the gathered features into the pixel colour
directly, with no volume rendering: colour = linear head on the mean over the ray's samples (GNT's head), or,
with `model.color_head=blend`, a learned blend of the source views' colours (models/heads.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.config import ModelConfig
from gnt_shiftadd.models.encodings import PositionalEncoding
from gnt_shiftadd.models.heads import make_color_head
from gnt_shiftadd.models.pretrained_features import AlexNetFeatures
from gnt_shiftadd.models.projector import SourceViews, SourceViewSampler
from gnt_shiftadd.models.resunet import ResUNet
from gnt_shiftadd.models.transformers import RayTransformerBlock, ViewTransformerBlock


def masked_max_over_views(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the visible views: [R, S, V, C], mask [R, S, V, 1] -> [R, S, C]; 0 where no view sees the point.

    GNT pools over all views, so a view the point projects outside of (zero-padded samples) still leaks into
    the query; excluding it keeps invisible views from influencing the output at all.
    """
    pooled = features.masked_fill(mask == 0, torch.finfo(features.dtype).min).max(dim=2).values
    return torch.where(mask.any(dim=2), pooled, torch.zeros_like(pooled))


class ViewEmbedding(nn.Module):
    """GNT's front end as a swappable leaf: the per-view MLP on [colour, CNN feature] and the masked max-pool over
    views that gives the first query. Straight from grid_sample's layout: rgb [V, 3, R, S], feat [V, F, R, S],
    mask [R, S, V, 1] -> features [R, S, V, C], q [R, S, C]. No parameters of its own: the transformer owns
    rgbfeat_fc1/rgbfeat_fc2 (state_dict keys unchanged) and passes them in; kernels.apply swaps this leaf for the
    fused view-features kernel."""

    def forward(self, rgb, feat, mask, fc1: nn.Module, fc2: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        rgb_feat = torch.cat([rgb.permute(2, 3, 0, 1), feat.permute(2, 3, 0, 1)], dim=-1)  # [R, S, V, 3 + F]
        features = fc2(F.relu(fc1(rgb_feat)))  # [R, S, V, C]
        return features, masked_max_over_views(features, mask)  # the query starts as a max-pool over views


class SampledViewEmbedding(nn.Module):
    """What the source views see at the samples, through GNT's front end, as one swappable leaf (kernels fuse the
    two, so the gathered [V, 3 + F, R, S] rows never reach memory): sampler(points, target_origin, views) ->
    rgb, feat, ray_diff, mask, then embedding(rgb, feat, mask, fc1, fc2) -> features, q. No parameters of its own.
    -> (features [R, S, V, C], q [R, S, C], colors [R, S, V, 3] (what each view sees; a view of rgb),
    ray_diff [R, S, V, 4], mask [R, S, V, 1])."""

    def forward(self, points, target_origin, views: SourceViews, sampler: nn.Module, embedding: nn.Module,
                fc1: nn.Module, fc2: nn.Module):
        rgb, feat, ray_diff, mask = sampler(points, target_origin, views)
        features, q = embedding(rgb, feat, mask, fc1, fc2)
        return features, q, rgb.permute(2, 3, 0, 1), ray_diff, mask


class PositionFusion(nn.Module):
    """GNT's position fusion as a swappable leaf: q <- mlp([q, point_code, dir_code]) with mlp = Linear, ReLU,
    Linear and point_code = encoding(points). The first layer is linear, so it splits by input block: W_q q +
    (W_p point_code + b) per sample and W_d dir_code once per *ray* (the direction is the same for all of a ray's
    samples), broadcast over the samples. Exact algebra (fp32 rounding aside): no [R, S, C + P + D] concatenation,
    ~38% fewer multiply-accumulates at GNT's widths. A BlockShiftLinear first layer (shiftadd.position_fusion:
    shift) splits the same way, its query block and the code's sines and cosines their own (shift) layers; any
    other first layer that is not a plain nn.Linear (a whole shift layer, torch.ao's int8 Linear) gets the
    concatenation it was built for. No parameters of its own: pos_fuse owns them (state_dict keys unchanged). The leaf takes the points, not their code, so a kernel can encode them in
    registers; `memo` (one dict per forward) keeps the code for the next fusion layer.
    q [R, S, C], points [R, S, 3], dir_code [R, D] (per ray) -> [R, S, C]."""

    def forward(self, q, points, dir_code, mlp: nn.Sequential, encoding: nn.Module, memo: dict) -> torch.Tensor:
        if "point_code" not in memo:
            memo["point_code"] = encoding(points)
        point_code = memo["point_code"]
        fc1, activation, fc2 = mlp
        channels, code_dim = q.shape[-1], point_code.shape[-1]
        split_query = getattr(fc1, "block", None) == channels  # a BlockShiftLinear: the query block is its own layer
        if type(fc1) is not nn.Linear and not split_query:
            per_ray = dir_code[:, None, :].expand(*q.shape[:2], -1)
            return mlp(torch.cat([q, point_code, per_ray], dim=-1))
        if split_query:
            from_query, weight, bias = fc1.first(q), fc1.rest.weight, fc1.rest.bias  # rest: [code | direction]
            if fc1.has_second:  # a block of the code (the sines and cosines) is a shift layer too
                start = fc1.second_start - channels
                end = start + fc1.second.in_features
                from_query = from_query + fc1.second(point_code[..., start:end])
                point_code = torch.cat([point_code[..., :start], point_code[..., end:]], dim=-1)
                code_dim = point_code.shape[-1]
        else:
            from_query, weight, bias = F.linear(q, fc1.weight[:, :channels]), fc1.weight[:, channels:], fc1.bias
        hidden = from_query + F.linear(point_code, weight[:, :code_dim], bias)
        hidden = hidden + F.linear(dir_code, weight[:, code_dim:])[:, None, :]
        return fc2(activation(hidden))


class GNTTransformer(nn.Module):
    """From the samples and the encoded source views to colours: the projection into the source views and the
    bilinear gathers (`source_sampler`), GNT's front end (`view_embedding`; both behind the `front_end` leaf), then
    the transformer stack and the head.

    forward: points [R, S, 3], ray_dirs [R, 3], target_origin [3], views (SourceViews) -> rgb [R, 3] (unbounded,
    as in GNT; clamp for display). forward_sampled: the same from what the views see, in grid_sample's layout
    (rgb [V, 3, R, S], feat [V, F, R, S], ray_diff [R, S, V, 4], mask [R, S, V, 1], points, ray_dirs).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.netwidth
        self.pos_enc = PositionalEncoding(3, cfg.pos_freqs)
        self.dir_enc = PositionalEncoding(3, cfg.dir_freqs)
        self.rgbfeat_fc1 = nn.Linear(cfg.feature_channels + 3, dim)
        self.rgbfeat_fc2 = nn.Linear(dim, dim)
        self.front_end = SampledViewEmbedding()  # its parts below (kernels.apply swaps this fused leaf first)
        self.source_sampler = SourceViewSampler()  # projection + bilinear gathers (a swappable leaf)
        self.view_embedding = ViewEmbedding()
        self.view_blocks = nn.ModuleList()
        self.ray_blocks = nn.ModuleList()
        self.pos_fuse = nn.ModuleList()  # at even layers: inject point/direction encodings into the query
        for layer in range(cfg.trans_depth):
            self.view_blocks.append(ViewTransformerBlock(dim, cfg.ff_mult * dim, cfg.dropout))
            self.ray_blocks.append(RayTransformerBlock(dim, cfg.num_heads, cfg.ff_mult * dim, cfg.dropout))
            if layer % 2 == 0:
                in_dim = dim + self.pos_enc.out_dim + self.dir_enc.out_dim
                self.pos_fuse.append(nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim)))
        self.position_fusion = PositionFusion()
        self.head = make_color_head(cfg.color_head, dim)

    def forward(self, points, ray_dirs, target_origin, views: SourceViews) -> torch.Tensor:
        features, q, colors, ray_diff, mask = self.front_end(points, target_origin, views, self.source_sampler,
                                                             self.view_embedding, self.rgbfeat_fc1, self.rgbfeat_fc2)
        return self.forward_embedded(features, q, ray_diff, mask, points, self.encode_directions(ray_dirs),
                                     colors=colors)

    def forward_sampled(self, rgb, feat, ray_diff, mask, points, ray_dirs) -> torch.Tensor:
        features, q = self.view_embedding(rgb, feat, mask, self.rgbfeat_fc1, self.rgbfeat_fc2)
        colors = rgb.permute(2, 3, 0, 1)  # [R, S, V, 3], a view: only the blend colour head reads it
        return self.forward_embedded(features, q, ray_diff, mask, points, self.encode_directions(ray_dirs),
                                     colors=colors)

    def encode_directions(self, ray_dirs) -> torch.Tensor:
        """NeRF encoding of the ray directions, once per ray [R, 3 + 6 Fd] (the points are encoded by the position
        fusion leaf, so a kernel can do it in registers)."""
        return self.dir_enc(F.normalize(ray_dirs, dim=-1))

    def forward_embedded(self, features, q, ray_diff, mask, points, dir_code, colors=None) -> torch.Tensor:
        """The transformer stack from the per-view features [R, S, V, C] and the pooled query [R, S, C] on
        (points [R, S, 3], dir_code [R, D]: encode_directions). colors [R, S, V, 3] (what each view sees at each
        sample) is needed by the blend head only."""
        memo: dict = {}  # the points' code, made by the first position fusion and reused by the others
        for layer, (view_block, ray_block) in enumerate(zip(self.view_blocks, self.ray_blocks)):
            q = view_block(q, features, ray_diff, mask)
            if layer % 2 == 0:
                q = self.position_fusion(q, points, dir_code, self.pos_fuse[layer // 2], self.pos_enc, memo)
            q = ray_block(q)
        if self.head.needs_colors and colors is None:
            raise ValueError("the blend colour head needs the source colours at the samples (colors [R, S, V, 3])")
        return self.head(q, features, colors, ray_diff, mask)


class GNT(nn.Module):
    """Feature CNN + GNT transformer.

    `forward` runs everything (CNN included) so one call covers all parameters: that is what training and
    DistributedDataParallel need. Rendering many chunks for one target encodes the sources once
    (`encode_sources`) and calls `render_points` per chunk.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.feature_extractor == "alexnet":
            self.feature_net = AlexNetFeatures(cfg.feature_channels)
        else:
            self.feature_net = ResUNet(
                out_channels=cfg.feature_channels, layers=tuple(cfg.resnet_layers), base_channels=cfg.resnet_base_channels
            )
        self.transformer = GNTTransformer(cfg)

    def encode_sources(self, src_rgb: torch.Tensor, src_K: torch.Tensor, src_c2w: torch.Tensor) -> SourceViews:
        """src_rgb [V, H, W, 3] in [0, 1] -> SourceViews with features [V, F, H/4, W/4]."""
        features = self.feature_net(src_rgb.permute(0, 3, 1, 2))
        return SourceViews(rgb=src_rgb, features=features, K=src_K, c2w=src_c2w)

    def render_points(self, points, ray_dirs, target_origin, views: SourceViews) -> torch.Tensor:
        """points [R, S, 3], ray_dirs [R, 3], target_origin [3] -> rgb [R, 3]."""
        return self.transformer(points, ray_dirs, target_origin, views)

    def forward(self, points, ray_dirs, target_origin, src_rgb, src_K, src_c2w) -> torch.Tensor:
        return self.render_points(points, ray_dirs, target_origin, self.encode_sources(src_rgb, src_K, src_c2w))

    def init_pretrained_parts(self) -> None:
        """Load the ImageNet weights of a pretrained feature extractor (a fresh model only; checkpoints carry them)."""
        if isinstance(self.feature_net, AlexNetFeatures):
            self.feature_net.load_imagenet_weights()

    def parameter_groups(self, lr_transformer: float, lr_cnn: float) -> list[dict]:
        """GNT's two Adam groups: the transformer and the feature CNN learn at different rates (frozen CNN
        weights are left out)."""
        return [
            {"params": list(self.transformer.parameters()), "lr": lr_transformer, "name": "transformer"},
            {"params": [p for p in self.feature_net.parameters() if p.requires_grad], "lr": lr_cnn, "name": "cnn"},
        ]
