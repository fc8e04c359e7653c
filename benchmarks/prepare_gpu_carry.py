"""Build the carry folder for the one-command GPU check (benchmarks/gpu_check.sh) and print the exact call.

  python benchmarks/prepare_gpu_carry.py [--carry gpu_carry] [--kernels DIR] [--scene DIR]
  python benchmarks/prepare_gpu_carry.py --dry-run --carry /tmp/carry        # CPU dry run: llvm kernels, tiny scene

What goes in (the GPU machine has Python 3.12 + torch but no TVM, no kornia and no package registry; files
reach it only as the working tree plus carried folders, 64 MiB in all):
  wheels/        cp312 manylinux wheels of apache-tvm-ffi, kornia, kornia-rs (the versions installed here)
  tvm_runtime/   libtvm_runtime.so, libtvm_runtime_cuda.so and VERSION (never the 247 MiB compiler library)
  kernels_cuda/  every kernel of configs/fern_gpu.yaml's model in every variant + the self-check's, AOT-compiled
                 for sm_90 (kernels/aot.py; an existing export given with --kernels is reused if it is current)
  fern/          poses_bounds.npy + images_<factor> of the scene the config trains on
  cache/         the converted LPIPS-Alex weights (so held-out LPIPS is measured, not null)
The total (carry + the working tree that travels with it) must stay under 64 MiB: the script fails, naming the
largest parts, if it does not.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gnt_shiftadd.config import load_config  # noqa: E402
from kernels import aot  # noqa: E402

LIMIT_BYTES = 64 * 2**20
WHEELS = {"apache-tvm-ffi": "tvm_ffi", "kornia": "kornia", "kornia-rs": "kornia_rs"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
DEFAULT_SCENE = REPO.parent / "shared" / "data" / "nerf_llff_data" / "fern"
# the dry run's model: as small as the test suite's, so its llvm kernels compile in seconds
DRY_RUN_OVERRIDES = ["data.num_source_views=3", "model.netwidth=16", "model.trans_depth=2", "model.num_heads=2",
                     "model.feature_channels=8", "model.resnet_layers=[1,1,1]", "model.resnet_base_channels=8",
                     "model.pos_freqs=4", "model.dir_freqs=2", "render.n_samples=8", "render.chunk_rays=512",
                     "train.n_rand=32", "eval.stride=2", "data.factor=4"]
DRY_RUN_VARIANTS = ["a_dense", "c_hash_shift_linears"]


class CarryError(RuntimeError):
    """The carry folder cannot be built (the message says what and where)."""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def working_tree_bytes() -> int:
    """What `run` copies besides the carry: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def download_wheels(dest: Path) -> list[Path]:
    """cp312 manylinux wheels of the packages the GPU machine lacks, at the versions installed here."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    for dist in WHEELS:
        version = importlib.metadata.version(dist)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), f"{dist}=={version}"]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CarryError(f"pip could not download {dist}=={version} for cp312 manylinux: "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return sorted(dest.glob("*.whl"))


def current_export(folder: Path, target: dict, requests: list) -> bool:
    """Whether an existing export can be reused: same format, TVM and target as here, and every requested kernel
    in it, compiled from the kernel sources as they are now (a kernel added since is a reason to rebuild)."""
    manifest_path = folder / aot.MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != aot.FORMAT_VERSION or manifest.get("tvm_version") != aot.runtime_version() \
            or {k: manifest.get("target", {}).get(k) for k in target} != target:
        return False
    problems = aot.export_serves(manifest, requests)
    for problem in problems[:5]:
        print(f"{folder}: rebuilding the export: {problem}")
    return not problems


def copy_scene(scene: Path, factor: int, dest: Path) -> None:
    images = scene / f"images_{factor}"
    if not (scene / "poses_bounds.npy").is_file() or not images.is_dir():
        raise CarryError(f"{scene} needs poses_bounds.npy and images_{factor}/ (the config's data.factor)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(scene / "poses_bounds.npy", dest / "poses_bounds.npy")
    shutil.copytree(images, dest / f"images_{factor}")


def prepare(carry: Path, config: str, scene: Path, kernels: Path | None, arch: str, dry_run: bool,
            wheels: bool = True) -> dict:
    carry.mkdir(parents=True, exist_ok=True)
    parts: dict[str, str] = {}
    if wheels:
        parts["wheels"] = ", ".join(p.name for p in download_wheels(carry / "wheels"))
    aot.copy_runtime(carry / "tvm_runtime", kinds=("llvm",) if dry_run else ("llvm", "cuda"))
    parts["tvm_runtime"] = (carry / "tvm_runtime" / "VERSION").read_text().strip()
    if dry_run:
        from data.synthetic import make_synthetic_scene  # noqa: PLC0415 (dry run only)

        if (carry / "scene").exists():
            shutil.rmtree(carry / "scene")
        make_synthetic_scene(carry / "scene", num_views=12, height=36, width=48, factor=4, seed=0)
        overrides = [*DRY_RUN_OVERRIDES, f"data.scene={carry / 'scene'}", "data.make_synthetic=false"]
        (carry / "dry_run_overrides.txt").write_text(" ".join(DRY_RUN_OVERRIDES) + "\n")
        cfg = load_config(REPO / "configs" / "default.yaml", overrides)
        folder, kind = carry / "kernels_llvm", "llvm"
        variants, checks = DRY_RUN_VARIANTS, False
    else:
        cfg = load_config(config, [f"data.scene={scene}"])
        copy_scene(scene, cfg.data.factor, carry / "fern")
        lpips = aot_lpips_weights()
        if lpips is not None:
            (carry / "cache").mkdir(exist_ok=True)
            shutil.copy2(lpips, carry / "cache" / lpips.name)
            parts["lpips"] = lpips.name
        folder, kind = carry / "kernels_cuda", "cuda"
        variants, checks = None, True
    target = {"kind": "cuda", "arch": arch} if kind == "cuda" else None
    if kernels is not None and target is not None \
            and current_export(kernels, target, aot.config_requests(cfg, kind, arch, variants, checks)[0]):
        if folder.resolve() != kernels.resolve():
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(kernels, folder)
        manifest = json.loads((folder / aot.MANIFEST_NAME).read_text())
    else:
        manifest = aot.export_for_config(cfg, kind, folder, arch=arch, variants=variants, checks=checks)
    parts[folder.name] = f"{len(manifest['kernels'])} kernels for {manifest['target']}"
    return parts


def aot_lpips_weights() -> Path | None:
    from gnt_shiftadd.evaluation.lpips import cached_weights_path  # noqa: PLC0415

    path = cached_weights_path("alex")
    return path if path.is_file() else None


def check_size(carry: Path) -> tuple[int, int]:
    carried, tree = folder_bytes(carry), working_tree_bytes()
    if carried + tree > LIMIT_BYTES:
        biggest = sorted(((folder_bytes(p) if p.is_dir() else p.stat().st_size, p.name) for p in carry.iterdir()),
                         reverse=True)[:4]
        raise CarryError(f"{carry} ({carried / 2**20:.1f} MiB) + the working tree ({tree / 2**20:.1f} MiB) exceed the "
                         f"64 MiB a device call carries; largest parts: "
                         + ", ".join(f"{name} {size / 2**20:.1f} MiB" for size, name in biggest))
    return carried, tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", type=Path, default=REPO / "gpu_carry", help="folder to build (git-ignored)")
    parser.add_argument("--config", default=str(REPO / "configs" / "fern_gpu.yaml"))
    parser.add_argument("--scene", type=Path, default=DEFAULT_SCENE, help="LLFF scene to train/time on the GPU")
    parser.add_argument("--kernels", type=Path, help="reuse this AOT export when it is current")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--dry-run", action="store_true", help="CPU dry run: llvm kernels, tiny procedural scene")
    parser.add_argument("--no-wheels", action="store_true", help="skip the wheel download (dry run: they are here)")
    args = parser.parse_args(argv)
    try:
        parts = prepare(args.carry, args.config, args.scene, args.kernels, args.arch, args.dry_run,
                        wheels=not args.no_wheels)
        carried, tree = check_size(args.carry)
    except (CarryError, aot.AOTManifestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, what in parts.items():
        print(f"  {name:14s} {what}")
    print(f"carry {args.carry}: {carried / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB "
          f"(limit 64 MiB)")
    try:
        carry_arg = str(args.carry.resolve().relative_to(REPO))
    except ValueError:
        carry_arg = str(args.carry)
    if args.dry_run:
        print(f"dry run: bash benchmarks/gpu_check.sh --dry-run --carry {shlex.quote(carry_arg)} /tmp/gpu_check_dry")
    else:
        print("GPU call (device tool `run`):\n"
              f"  command: bash benchmarks/gpu_check.sh --carry {carry_arg} \"$OUT\"\n"
              f"  carry:   [\"{carry_arg}\"]\n  timeout_s: 560 (the check budgets 530 s; GPU_CHECK_TRAIN_MINUTES shortens training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
