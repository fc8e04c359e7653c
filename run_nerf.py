#!/usr/bin/env python
"""ShiftAdd-GNT command line: a thin layer over gnt_shiftadd.workflows.

  python run_nerf.py                                   # embedded default: synthetic scene, train, eval, video
  python run_nerf.py train --config configs/fern.yaml [--resume [CKPT]] [key=value ...]
  python run_nerf.py eval  --config configs/fern.yaml [--ckpt CKPT] [key=value ...]
  python run_nerf.py render --config configs/fern.yaml [--ckpt CKPT] [key=value ...]
  python run_nerf.py all   --config configs/fern.yaml [key=value ...]
  python run_nerf.py finetune --config configs/fern.yaml --config configs/shiftadd/e_moe.yaml \
      --from outputs/fern_cpu/checkpoints/latest.pt name=fern_e_moe   # convert a trained GNT, fine-tune in stages
  python run_nerf.py reparam  --config ... --from CKPT name=...     # convert only (no fine-tuning)
  python run_nerf.py prepare --images PHOTOS --out SCENE [--factor 4]   # photos -> LLFF scene (pycolmap SfM)
  python run_nerf.py report --config configs/fern.yaml [--scene PATH] [--teacher CKPT] --out DIR \
      [report.finetune_steps=200 ...]   # PSNR vs latency vs energy of every variant: table, plots, crops
Several --config files are merged in order (later ones win), then the overrides.
Overrides use dotted keys, e.g. train.steps=500 data.scene=/path/to/scene render.n_samples=32.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
# commands that only render (on the TVM kernels by default): PyTorch's OpenMP workers must not spin beside them
# (gnt_shiftadd.runtime.quiet_openmp_workers); training commands keep libgomp's default
RENDERING_COMMANDS = ("eval", "render", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    for name, help_text in [("train", "train (or resume) a model"), ("eval", "evaluate held-out views"),
                            ("render", "render a spiral video"), ("all", "train, evaluate and render"),
                            ("finetune", "convert a trained GNT to a ShiftAdd variant and fine-tune it in stages"),
                            ("reparam", "convert a trained GNT to a ShiftAdd variant (no fine-tuning)"),
                            ("report", "PSNR vs latency vs energy of every ShiftAdd variant (table, plots, crops)"),
                            ("export-kernels", "compile every kernel the model uses ahead of time (kernels/aot.py): "
                                               "they load later with the TVM runtime only")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", action="append",
                       help=f"YAML file, repeatable (default: {DEFAULT_CONFIG.name}, or the checkpoint's own config)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--scene", help="scene folder (same as data.scene=...)")
        if name == "train":
            p.add_argument("--resume", nargs="?", const=True, default=None,
                           help="continue the run in the run folder (or from the given checkpoint)")
            p.add_argument("--init", help="start from these weights: 'pretrained' (the shipped cross-scene model) or "
                                          "a checkpoint; the model section is taken from it (same as train.init_from=)")
        if name in ("eval", "render"):
            p.add_argument("--ckpt", help="checkpoint, or 'pretrained' for the shipped cross-scene model "
                                          "(default: <out_dir>/<name>/checkpoints/latest.pt)")
        if name in ("eval", "render", "all"):
            p.add_argument("--kernels", choices=("auto", "torch", "tvm"),
                           help="inference backend: compiled TVM kernels where they build (auto, the default), "
                                "always (tvm) or the PyTorch reference modules (torch); same as render.kernels=...")
        if name in ("finetune", "reparam"):
            p.add_argument("--from", dest="init_from", required=True,
                           help="checkpoint of the trained model to convert, or 'pretrained'")
        if name == "report":
            p.add_argument("--out", required=True, help="report folder (re-running it reuses finished parts)")
            p.add_argument("--teacher", help="trained dense GNT checkpoint (default: train one for train.steps)")
        if name == "export-kernels":
            p.add_argument("--target", required=True, choices=("cuda", "llvm"), help="cuda (GPU) or llvm (this CPU)")
            p.add_argument("--arch", default="sm_90", help="CUDA architecture (default sm_90: H100/H200)")
            p.add_argument("--out", required=True, help="folder for the libraries and manifest.json")
            p.add_argument("--variants", help="comma-separated configs/shiftadd names (default: all)")
            p.add_argument("--no-checks", action="store_true",
                           help="leave out the kernels of the kernel self-check (tests/kernels/test_cuda_kernels.py)")
    p = sub.add_parser("prepare", help="photos -> an LLFF scene with COLMAP structure-from-motion (pycolmap)")
    p.add_argument("--images", required=True, help="folder of photos of one scene (one camera, one size)")
    p.add_argument("--out", required=True, help="scene folder to write (poses_bounds.npy, images/, images_<factor>/)")
    p.add_argument("--factor", type=int, default=4, help="also write images_<factor>/ downscaled by it (default 4)")
    p.add_argument("--threads", type=int, default=-1, help="CPU threads for COLMAP (default: all)")
    p.add_argument("--overwrite", action="store_true", help="redo a scene folder that was prepared before")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def resolve_config(args):
    """Config files <- overrides; `--ckpt` alone means the checkpoint's own config; 'pretrained' (for --ckpt,
    --init, --from) is the shipped model, whose model section the run then takes."""
    from gnt_shiftadd.config import load_config
    from gnt_shiftadd.pretrained import resolve_checkpoint
    from gnt_shiftadd.training.checkpoint import config_of_checkpoint

    for attr in ("ckpt", "init", "init_from"):
        if getattr(args, attr, None):
            setattr(args, attr, str(resolve_checkpoint(getattr(args, attr))))
    if getattr(args, "scene", None):
        args.overrides = [*args.overrides, f"data.scene={args.scene}"]
    if getattr(args, "kernels", None):
        args.overrides = [*args.overrides, f"render.kernels={args.kernels}"]
    if getattr(args, "init", None):
        args.overrides = [*args.overrides, f"train.init_from={args.init}"]
    if args.config is None and getattr(args, "ckpt", None):
        base = config_of_checkpoint(args.ckpt)
        if getattr(args, "scene", None):  # a new scene with a given model: its own run folder, scene-sized data
            base.name, base.data.make_synthetic, base.data.train_scenes = f"{base.name}_{Path(args.scene).name}", False, []
        return load_config(None, args.overrides, base=base)
    paths = args.config or [DEFAULT_CONFIG]
    cfg = None
    for path in paths[:-1]:
        cfg = load_config(path, (), base=cfg)
    cfg = load_config(paths[-1], args.overrides, base=cfg)
    start_from = getattr(args, "init", None) or getattr(args, "init_from", None)
    if start_from:  # fine-tuning keeps the architecture of the weights it starts from
        cfg.model = config_of_checkpoint(start_from).model
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The CLI imports the library inside its functions on purpose: `--help` and argument errors answer without
    # loading torch, and the allocator is tuned before the library allocates anything.
    from gnt_shiftadd.runtime import quiet_openmp_workers, tune_cpu_allocator

    tune_cpu_allocator()  # large tensors reuse heap memory instead of page-faulting fresh mmaps (see runtime.py)
    if args.command in RENDERING_COMMANDS and getattr(args, "kernels", None) != "torch":
        quiet_openmp_workers()  # before torch loads: no spinning OpenMP workers beside the TVM kernels
    from data.scene import SceneError
    from gnt_shiftadd import workflows
    from gnt_shiftadd.config import ConfigError
    from gnt_shiftadd.shiftadd.reparameterize import ReparameterizeError
    from gnt_shiftadd.training.checkpoint import CheckpointError
    from gnt_shiftadd.training.trainer import TrainingError

    try:
        if args.command is None:  # the embedded default
            from gnt_shiftadd.config import load_config

            summary = workflows.run_all(load_config(DEFAULT_CONFIG))
            print(json.dumps(summary, indent=2))
            print(f"\nDone. Outputs are in {summary['run_dir']}/ (eval/ images + metrics.json, video/video.mp4, "
                  f"tensorboard/ logs: tensorboard --logdir {summary['run_dir']}/tensorboard)")
            return 0
        if args.command == "prepare":
            from data.prepare import prepare_scene

            report = prepare_scene(args.images, args.out, factor=args.factor, threads=args.threads,
                                   progress=not args.quiet, overwrite=args.overwrite)
            print(json.dumps(report, indent=2))
            print(f"\nscene ready: python run_nerf.py all --config configs/fern_blend.yaml data.scene={args.out} "
                  f"data.factor={args.factor} name={Path(args.out).name}")
            return 0
        cfg = resolve_config(args)
        progress = not args.quiet
        if args.command == "train":
            from gnt_shiftadd.training.trainer import train

            result = train(cfg, resume=args.resume, progress=progress)
            print(f"trained to step {result.step}; checkpoint: {result.checkpoint}")
        elif args.command == "eval":
            result = workflows.run_eval(cfg, args.ckpt, progress)
            print(json.dumps(result["mean"], indent=2))
            print(f"metrics and images: {cfg.run_dir / 'eval'}")
        elif args.command == "render":
            result = workflows.run_render(cfg, args.ckpt, progress)
            print(f"video: {result['video']} ({result['ms_per_frame']:.0f} ms/frame)")
        elif args.command == "all":
            print(json.dumps(workflows.run_all(cfg, progress=progress), indent=2))
        elif args.command == "finetune":
            result = workflows.run_finetune(cfg, args.init_from, progress)
            print(f"fine-tuned to step {result.step}; checkpoint: {result.checkpoint}")
        elif args.command == "reparam":
            print(f"converted checkpoint: {workflows.run_reparam(cfg, args.init_from, progress)}")
        elif args.command == "report":
            from gnt_shiftadd.report import run_report

            record = run_report(cfg, args.out, teacher=args.teacher, progress=progress)
            print((Path(args.out) / "report.md").read_text())
            print(f"report: {Path(args.out) / 'report.json'} (best PSNR per ms: {record.get('best_psnr_per_ms')})")
        elif args.command == "export-kernels":
            from kernels.aot import AOTManifestError, export_for_config
            from kernels.build import KernelBuildError

            try:
                manifest = export_for_config(cfg, args.target, args.out, arch=args.arch, checks=not args.no_checks,
                                             variants=args.variants.split(",") if args.variants else None,
                                             progress=progress)
            except (KernelBuildError, AOTManifestError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(f"{len(manifest['kernels'])} kernels for {manifest['target']} (TVM {manifest['tvm_version']}) in "
                  f"{args.out}; load them with SHIFTADD_GNT_AOT_KERNELS={args.out}")
    except (ConfigError, SceneError, CheckpointError, TrainingError, ReparameterizeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
