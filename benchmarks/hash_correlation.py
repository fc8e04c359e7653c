"""How closely the hashed attention's code similarity tracks the real q.k^T it replaces.

  python benchmarks/hash_correlation.py --out results/hash_correlation.json                  # synthetic data only
  python benchmarks/hash_correlation.py --out results/hash_correlation_fern.json \
      --checkpoint outputs/fern_cpu/checkpoints/latest.pt                                     # + a trained fern GNT

Metric: for every query row (ray, head, sample), the Pearson correlation along the keys between the code
similarity code(q) . code(k) (+-1 codes, = n - 2 Hamming) and q . k^T; the mean over rows. Three hashers with
`shiftadd.hash_bits` bits per head (default 16):
  random  - random hyperplanes, the hasher's initialisation (LSH); mean over --random-seeds seeds
  pca_itq - the data-driven start alone: centred PCA + ITQ rotation (`BinaryHasher.fit(..., iterations=0)`)
  fitted  - what conversion uses: PCA + ITQ + the KSH-style refinement (`BinaryHasher.fit`)
Each is fitted on one batch and scored on held-out data:
  synthetic: rank-3 Gaussian q/k + noise, off-centre, [rays, 1 head, 12 samples, 8 dims] (tests/test_hashed_attention.py)
  checkpoint: the trained GNT's own ray-transformer queries/keys, per layer, from its dense model (no layer converted):
              fitted on the calibration rays conversion uses (random pixels of training views), scored on --rays
              random pixels of every held-out view. A randomly initialised model's q/k say nothing about a trained
              one's, so this part needs a trained checkpoint.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment, write_record  # noqa: E402
from gnt_shiftadd.models.transformers import DotProductAttention, RayAttention  # noqa: E402
from gnt_shiftadd.shiftadd.hashed_attention import BinaryHasher  # noqa: E402
from gnt_shiftadd.training.checkpoint import config_of_checkpoint  # noqa: E402
from gnt_shiftadd.training.warm_start import calibration_forward  # noqa: E402
from gnt_shiftadd.workflows import load_trained  # noqa: E402
from renderer.rays import camera_rays  # noqa: E402
from renderer.render import Renderer, RenderSettings  # noqa: E402


def mean_row_correlation(similarity: torch.Tensor, real: torch.Tensor) -> float:
    """Mean over query rows of the Pearson correlation along the keys; similarity, real [..., Sq, Sk]."""
    similarity = similarity - similarity.mean(-1, keepdim=True)
    real = real - real.mean(-1, keepdim=True)
    norms = (similarity.norm(dim=-1) * real.norm(dim=-1)).clamp_min(1e-12)
    return float(((similarity * real).sum(-1) / norms).mean())


def code_correlation(hasher: BinaryHasher, q: torch.Tensor, k: torch.Tensor) -> float:
    """q, k [R, H, S, d] -> mean row correlation of the +-1 code similarity with q k^T."""
    codes_q, codes_k = hasher.signed_codes(q), hasher.signed_codes(k)
    return mean_row_correlation(codes_q @ codes_k.transpose(-1, -2), q @ k.transpose(-1, -2))


@torch.no_grad()
def compare_hashers(fit_q, fit_k, eval_q, eval_k, n_bits: int, random_seeds: int) -> dict:
    """{"random", "random_min", "random_max", "pca_itq", "fitted"}: correlations on the held-out q/k."""
    heads, head_dim = fit_q.shape[1], fit_q.shape[-1]
    random_scores = []
    for seed in range(random_seeds):
        torch.manual_seed(seed)
        random_scores.append(code_correlation(BinaryHasher(heads, head_dim, n_bits), eval_q, eval_k))
    torch.manual_seed(0)
    pca_itq = BinaryHasher(heads, head_dim, n_bits)
    pca_itq.fit(fit_q, fit_k, iterations=0)
    torch.manual_seed(0)
    fitted = BinaryHasher(heads, head_dim, n_bits)
    fitted.fit(fit_q, fit_k)
    return {"random": float(np.mean(random_scores)), "random_min": min(random_scores),
            "random_max": max(random_scores), "pca_itq": code_correlation(pca_itq, eval_q, eval_k),
            "fitted": code_correlation(fitted, eval_q, eval_k)}


def synthetic(n_bits: int, random_seeds: int) -> dict:
    """The low-rank test data: fit on one batch of 64 rays, scored on another 64."""
    generator = torch.Generator().manual_seed(0)
    basis, offset = torch.randn(3, 8, generator=generator), 2 * torch.randn(8, generator=generator)

    def batch():
        return (torch.randn(64, 1, 12, 3, generator=generator) @ basis
                + 0.05 * torch.randn(64, 1, 12, 8, generator=generator) + offset)

    fit_q, fit_k = batch(), batch()
    eval_q, eval_k = batch(), batch()
    return {"data": "rank-3 Gaussian + 0.05 noise, off-centre; q/k [64, 1, 12, 8]; fitted on one batch, scored on another",
            **compare_hashers(fit_q, fit_k, eval_q, eval_k, n_bits, random_seeds)}


class QueryKeyCapture:
    """Forward hooks on every RayAttention's core: the (q, k) [R, H, S, d] of each layer, appended per call."""

    def __init__(self, model):
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, RayAttention)}
        if not self.layers:
            raise ValueError("the model has no ray attention layers to capture")
        self.captured: dict[str, list] = {name: [] for name in self.layers}
        self.handles = []

    def __enter__(self):
        for name, layer in self.layers.items():
            self.handles.append(layer.core.register_forward_hook(
                lambda _m, inputs, _o, name=name: self.captured[name].append((inputs[0].float(), inputs[1].float()))))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def joined(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (torch.cat([q for q, _ in calls]), torch.cat([k for _, k in calls]))
                for name, calls in self.captured.items()}


@torch.no_grad()
def heldout_queries_keys(model, tensors, cfg, rays_per_view: int, seed: int = 0) -> dict:
    """{layer: (q, k)} of `rays_per_view` random pixels of every held-out view, rendered from its nearest
    training views, as evaluation renders them."""
    scene = tensors.scene
    if len(scene.test_ids) == 0:
        raise ValueError(f"scene {scene.root} has no held-out views (data.llffhold={cfg.data.llffhold})")
    renderer = Renderer(RenderSettings.from_config(cfg).with_(autocast="none"), kind=scene.kind)
    rng = np.random.default_rng(seed)
    with QueryKeyCapture(model) as capture:
        for view in scene.test_ids:
            view = int(view)
            sources = tensors.nearest_sources(scene.c2w[view], cfg.data.num_source_views, exclude_view=view)
            views = model.encode_sources(*tensors.source_inputs(sources))
            K = torch.as_tensor(scene.intrinsics[view], dtype=torch.float32)
            c2w = torch.as_tensor(scene.c2w[view], dtype=torch.float32)
            origins, directions = (t.reshape(-1, 3) for t in camera_rays(K, c2w, scene.height, scene.width))
            pick = torch.from_numpy(rng.choice(origins.shape[0], min(rays_per_view, origins.shape[0]), replace=False))
            near, far = scene.depth_range(view)
            renderer.render_rays(lambda p, d, o: model.render_points(p, d, o[0], views),
                                 origins[pick].to(tensors.device), directions[pick].to(tensors.device), near, far)
    return capture.joined()


def trained_model(checkpoint: str, config: str | None, overrides: list[str], n_bits: int, random_seeds: int,
                  rays_per_view: int) -> dict:
    """Per ray-transformer layer of the checkpoint's dense model: the three hashers' correlations."""
    cfg = load_config(config, overrides) if config else load_config(None, overrides, base=config_of_checkpoint(checkpoint))
    model, tensors, _ = load_trained(cfg, checkpoint, backend="torch")
    if any(not isinstance(m.core, DotProductAttention) for m in model.modules() if isinstance(m, RayAttention)):
        raise ValueError(f"{checkpoint}: its ray attention is already hashed; give a dense (variant a) checkpoint")
    with QueryKeyCapture(model) as capture:
        calibration_forward(model, tensors, cfg)()
    fit = capture.joined()
    held_out = heldout_queries_keys(model, tensors, cfg, rays_per_view)
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    layers = {name: {"fit_rays": fit[name][0].shape[0], "eval_rays": held_out[name][0].shape[0],
                     **compare_hashers(*fit[name], *held_out[name], n_bits, random_seeds)} for name in fit}
    return {"checkpoint": str(checkpoint), "checkpoint_step": int(payload.get("step", -1)),
            "scene": cfg.data.scene, "model": cfg.to_dict()["model"], "calibration_rays": cfg.train.calibration_rays,
            "heldout_views": [int(v) for v in tensors.scene.test_ids], "layers": layers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", help="a trained dense GNT (its own config is used; overrides apply)")
    parser.add_argument("--config", help="config instead of the checkpoint's own (its model must match)")
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--random-seeds", type=int, default=8)
    parser.add_argument("--rays", type=int, default=256, help="random pixels per held-out view")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint} does not exist")
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv[:1] + (argv or sys.argv[1:])),
              "environment": environment(), "bits": args.bits,
              "metric": "mean over query rows of the Pearson correlation (along the keys) of code(q).code(k) with q.k^T",
              "synthetic": synthetic(args.bits, args.random_seeds)}
    print("synthetic:", {k: round(v, 3) for k, v in record["synthetic"].items() if isinstance(v, float)})
    if args.checkpoint:
        record["trained"] = trained_model(args.checkpoint, args.config, args.overrides, args.bits, args.random_seeds,
                                          args.rays)
        for name, scores in record["trained"]["layers"].items():
            print(name, {k: round(v, 3) for k, v in scores.items() if isinstance(v, float)})
    write_record(args.out, record, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
