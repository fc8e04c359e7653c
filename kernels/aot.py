"""Ahead-of-time (AOT) kernels: compile every kernel a model uses once, load them later with the TVM runtime only.

Why: the TVM compiler library (libtvm_compiler.so, 247 MiB) cannot travel to every machine (e.g. a GPU lent for
minutes, 64 MiB of files), but the runtime (libtvm_runtime*.so, ~4 MiB) and the apache-tvm-ffi wheel can. An
exported kernel is a shared library (`export_library`) that `tvm_ffi.load_module` opens in a process that never
imports `tvm`.

Export (needs the compiler):
  model_requests(cfg, variants, target) -> [KernelRequest]   what a model of cfg's shapes requests, per variant
  check_requests(target) -> [KernelRequest]                   what kernels/selfcheck.py requests (the CUDA tests)
  export_kernels(requests, target, out_dir) -> manifest dict  one .so per kernel (+ .cubin on CUDA), manifest.json
The CLI is `python run_nerf.py export-kernels --target cuda|llvm [--arch sm_90] --out DIR [--config ...]`.

Load (runtime only):
  AOTKernels(directory, device)   validates manifest.json (format, TVM version, target, kernel sources), loads the
                                  TVM runtime libraries, and is a kernels.dispatch loader: (name, key, device) ->
                                  kernel or None. Refuses a manifest from another TVM version, target or kernel
                                  source with AOTManifestError naming the field.
  install(directory, device) / install_from_environment()   register it with the kernel facade; the environment
                                  form reads $SHIFTADD_GNT_AOT_KERNELS (and $SHIFTADD_GNT_TVM_RUNTIME).

Manifest (manifest.json): {"format", "tvm_version", "target", "created", "description", "kernels": [{"name",
"key", "module", "source_sha256", "file", "arguments": [{"name", "shape" (symbolic token/ray/tile dims as
names), "dtype"}], "cuda_sources": [{"sha256", "cubin"}]}]}.

What a runtime-only process needs (checked on TVM 0.27.0.post1):
  * libtvm_runtime.so loaded with RTLD_GLOBAL before any kernel library: CPU kernels call the runtime's parallel
    launcher through a function pointer the library loader fills in; without it the first parallel kernel
    segfaults. (libtvm_ffi.so comes with the tvm_ffi package.)
  * CUDA: libtvm_runtime_cuda.so (registers the "cuda" module loader; links libcudart.so.13, which torch has
    already loaded, and the driver's libcuda.so.1). TVM 0.27 stores a CUDA kernel as CUDA C source (format
    "cuda") and compiles it when the library is loaded, through the global callback `tvm_callback_cuda_compile`
    that `tvm.support.nvcc` registers (NVRTC via cuda-bindings plus the CUDA headers). A runtime-only machine
    has none of that, so the export compiles each CUDA source to a cubin here (NVRTC, for the target's arch) and
    stores it beside the library; the loader registers a callback that returns the stored cubin for exactly that
    source (by SHA-256) and refuses any other source.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import datetime
import glob
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from kernels import dispatch
from kernels.build import KernelBuildError, build_kernel, library_path

__all__ = ["MANIFEST_NAME", "FORMAT_VERSION", "AOT_ENV", "RUNTIME_ENV", "KernelRequest", "AOTManifestError",
           "model_requests", "check_requests", "record_requests", "export_kernels", "export_for_config",
           "kernel_source_sha256", "copy_runtime",
           "runtime_library_dir", "runtime_version", "load_runtime", "AOTKernels", "install",
           "install_from_environment", "RUNTIME_LIBRARIES"]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
AOT_ENV = "SHIFTADD_GNT_AOT_KERNELS"  # a folder written by export_kernels: installed as a kernel loader
RUNTIME_ENV = "SHIFTADD_GNT_TVM_RUNTIME"  # a folder with libtvm_runtime*.so and VERSION (prepare_gpu_carry.py)
CPU_ONLY_KERNELS = {"int_shift", "int_ffn", "int_ffn_sublayer"}  # AVX-512 VNNI (kernels/int_shift.py): built for the host CPU whatever the target
RUNTIME_LIBRARIES = {"llvm": ["libtvm_runtime.so"], "cuda": ["libtvm_runtime.so", "libtvm_runtime_cuda.so"]}
# modules that hold no kernel math: editing them does not make an exported kernel stale
_INFRASTRUCTURE = {"kernels", "kernels.aot", "kernels.apply", "kernels.backend", "kernels.build", "kernels.dispatch",
                   "kernels.ops", "kernels.selfcheck"}


class AOTManifestError(RuntimeError):
    """An AOT kernel folder that cannot be used here (the message names the manifest field and what differs)."""


@dataclass
class KernelRequest:
    """One kernel a model asks the facade for: name, static shape key and make(target) -> tvm.IRModule."""

    name: str
    key: dict
    make: Callable

    @property
    def module(self) -> str:
        return _defining_module(self.make)

    def identity(self) -> tuple[str, str]:
        return self.name, json.dumps(self.key, sort_keys=True)


# ------------------------------------------------------------------------------------------------ source hashes

def _defining_module(make: Callable) -> str:
    """The kernels.* module whose TE code `make` runs (a lambda in a wrapper closes over its module's make_*)."""
    module = inspect.getmodule(make)
    return module.__name__ if module is not None else getattr(make, "__module__", "?")


def _kernel_dependencies(module_name: str) -> list[str]:
    """module_name plus the kernels.* modules its globals come from (te_math, mat_shift for ffn, ...), sorted."""
    seen: set[str] = set()
    pending = [module_name]
    while pending:
        name = pending.pop()
        if name in seen or name in _INFRASTRUCTURE or not name.startswith("kernels."):
            continue
        seen.add(name)
        for value in vars(importlib.import_module(name)).values():
            origin = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(origin, str) and origin.startswith("kernels."):
                pending.append(origin)
    return sorted(seen)


def kernel_source_sha256(module_name: str) -> str:
    """SHA-256 over the source files of a kernel module and the kernel modules it uses: an exported kernel is
    stale exactly when one of them changed (loading never needs the compiler for this)."""
    digest = hashlib.sha256()
    for name in _kernel_dependencies(module_name):
        path = Path(importlib.import_module(name).__file__)
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- recording requests

def _key_for_target(name: str, key: dict, target: dict) -> dict:
    """The key the facade is asked for on `target`'s device. Requests are recorded on CPU tensors; the only key
    that depends on the device type is the view attention's tile (kernels.view_attention.kernel_tile)."""
    if name == "view_attention":
        from kernels.view_attention import kernel_tile  # noqa: PLC0415 (cycle: view_attention -> dispatch)

        return {**key, "tile": kernel_tile("cuda" if target["kind"] == "cuda" else "cpu", key["views"],
                                           key["channels"])}
    return key


@contextlib.contextmanager
def record_requests(target: dict) -> Iterator[list[KernelRequest]]:
    """Inside, every kernel the facade is asked for is recorded (retargeted to `target`) instead of built, and
    the PyTorch reference runs; yields the list of distinct requests. Loaders are set aside meanwhile."""
    requests: dict[tuple, KernelRequest] = {}

    def recorder(name, key, target_, make):
        request = KernelRequest(name, _key_for_target(name, key, target), make)
        requests.setdefault(request.identity(), request)
        raise KernelBuildError(f"{name}: recording kernel requests for an export")

    saved = (dispatch.build_kernel, dispatch.tvm_available, list(dispatch._LOADERS))
    dispatch.build_kernel, dispatch.tvm_available = recorder, lambda: True
    dispatch._LOADERS.clear()
    dispatch._MEMO.clear()
    recorded: list[KernelRequest] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # each recorded kernel "falls back": expected here
            yield recorded
    finally:
        dispatch.build_kernel, dispatch.tvm_available = saved[0], saved[1]
        dispatch._LOADERS[:] = saved[2]
        dispatch._MEMO.clear()
        recorded.extend(requests.values())


def _scene_for(cfg, root: Path):
    """A tiny procedural LLFF scene with enough views for cfg's source views (the model's shapes do not depend
    on the image size)."""
    from data.llff import load_llff_scene  # noqa: PLC0415 (export-only imports: the loader needs none of them)
    from data.synthetic import make_synthetic_scene  # noqa: PLC0415

    views = max(cfg.data.num_source_views + 2, 8) + 2
    make_synthetic_scene(root, num_views=views, height=24, width=32, factor=cfg.data.factor, seed=0)
    return load_llff_scene(root, factor=cfg.data.factor, llffhold=cfg.data.llffhold)


def model_requests(cfg, variants: dict[str, Path] | None = None, target: dict | None = None,
                   rays: int = 16, skipped: dict | None = None,
                   per_variant: dict | None = None) -> list[KernelRequest]:
    """The kernels a (ShiftAdd-)GNT of cfg's shapes requests for each variant config (default: every file in
    configs/shiftadd/), with every dense-shaped product on the kernels (gemm="tvm": what CUDA runs; CPU exports
    then serve gemm="tvm" too). Random weights: the shapes, not the values, decide the kernels. With a dict
    `skipped`, a variant that fails to build or run is recorded there ({name: error}) instead of raising; with a
    dict `per_variant`, each variant's requests are listed there ({name: [(kernel, key json)]})."""
    from gnt_shiftadd.config import load_config  # noqa: PLC0415
    from gnt_shiftadd.experiment import SceneTensors, build_model  # noqa: PLC0415
    from gnt_shiftadd.training.warm_start import calibration_forward  # noqa: PLC0415
    from gnt_shiftadd.variants import variant_configs  # noqa: PLC0415
    from kernels.apply import use_kernels  # noqa: PLC0415

    target = target or {"kind": "llvm"}
    variants = variants if variants is not None else variant_configs()
    found: dict[tuple, KernelRequest] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scene = SceneTensors(_scene_for(cfg, Path(tmp) / "scene"), torch.device("cpu"))
        for name, path in variants.items():
            variant_cfg = load_config(path, ["device=cpu", f"train.calibration_rays={rays}"], base=copy.deepcopy(cfg))
            try:
                model = build_model(variant_cfg, torch.device("cpu")).eval()
                with record_requests(target) as recorded:
                    use_kernels(model, "tvm", gemm="tvm", device_type="cuda" if target["kind"] == "cuda" else "cpu")
                    with torch.no_grad():
                        calibration_forward(model, scene, variant_cfg)()
            except Exception as error:  # one variant that cannot run must not stop the others' export
                if skipped is None:
                    raise
                skipped[name] = f"{type(error).__name__}: {error}"
                warnings.warn(f"export: variant {name} skipped: {skipped[name]}", RuntimeWarning, stacklevel=2)
                continue
            for request in recorded:
                found.setdefault(request.identity(), request)
            if per_variant is not None:
                per_variant[name] = sorted({r.identity() for r in recorded})
    return list(found.values())


def check_requests(target: dict | None = None) -> list[KernelRequest]:
    """The kernels kernels/selfcheck.py (tests/kernels/test_cuda_kernels.py) requests, retargeted to `target`."""
    from kernels import selfcheck  # noqa: PLC0415 (cycle: selfcheck -> the kernel modules -> dispatch)

    with record_requests(target or {"kind": "llvm"}) as recorded:
        selfcheck.run_checks(torch.device("cpu"), quick=True)  # the same kernels as the full sizes
    return recorded


# ------------------------------------------------------------------------------------------------------- export

def _argument_table(function) -> list[dict]:
    """[{"name", "shape", "dtype"}] of a PrimFunc's buffers; symbolic dims (token/ray/tile counts) as names."""
    from tvm.tirx import IntImm  # noqa: PLC0415 (export needs the compiler)

    return [{"name": str(p.name), "dtype": str(p.dtype),
             "shape": [int(d) if isinstance(d, IntImm) else str(d) for d in p.shape]} for p in function.params]


def _cuda_path() -> str | None:
    """A CUDA root with include/cuda_runtime.h for NVRTC: $CUDA_PATH, /usr/local/cuda, or the nvidia pip wheels."""
    candidates = [os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "cu1*")))
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "include", "cuda_runtime.h")):
            return candidate
    return None


def _compile_cubin(source: str, arch: str) -> bytes:
    """CUDA C source -> cubin for `arch` with NVRTC (TVM's own wrapper; needs cuda-bindings + CUDA headers)."""
    cuda_path = _cuda_path()
    if cuda_path is None:
        raise KernelBuildError("CUDA export needs the CUDA headers (include/cuda_runtime.h) for NVRTC: set CUDA_PATH "
                               "or pip install cuda-toolkit")
    previous = os.environ.get("CUDA_PATH")
    os.environ["CUDA_PATH"] = cuda_path
    try:
        from tvm.support import nvcc  # noqa: PLC0415 (export needs the compiler)

        return bytes(nvcc.compile_cuda(source, target_format="cubin", arch=arch))
    except (ImportError, RuntimeError) as error:
        raise KernelBuildError(f"NVRTC could not compile a CUDA kernel for {arch}: {error}") from error
    finally:
        if previous is None:
            os.environ.pop("CUDA_PATH", None)
        else:
            os.environ["CUDA_PATH"] = previous


def _file_stem(request: KernelRequest, target: dict) -> str:
    blob = json.dumps({"name": request.name, "key": request.key, "target": target}, sort_keys=True)
    return f"{request.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def export_kernels(requests: list[KernelRequest], target: dict, out_dir: str | Path, description: dict | None = None,
                   progress: bool = True) -> dict:
    """Compile every request for `target` into out_dir (one .so each, plus a .cubin per CUDA source) and write
    manifest.json; returns the manifest. A previous export in out_dir is replaced."""
    import tvm  # noqa: PLC0415 (export needs the compiler; the loader never imports tvm)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = out_dir / MANIFEST_NAME
    if old.exists():  # replace a previous export's files, leave anything else alone
        for entry in json.loads(old.read_text()).get("kernels", []):
            for name in [entry.get("file")] + [c.get("cubin") for c in entry.get("cuda_sources", [])]:
                if name and (out_dir / name).is_file():
                    (out_dir / name).unlink()
        old.unlink()
    unique = {r.identity(): r for r in requests}
    entries = []
    for index, request in enumerate(sorted(unique.values(), key=lambda r: r.identity()), 1):
        where = f"kernel {request.name!r} {request.key} for target {target}"
        stem = _file_stem(request, target)
        module = request.make(target)
        cuda_sources = []
        if target["kind"] != "cuda":  # the JIT cache's library is exactly an export: build (or find) it, copy it
            build_kernel(request.name, request.key, target, request.make)
            shutil.copy2(library_path(request.name, request.key, target, request.make), out_dir / f"{stem}.so")
        else:
            try:
                library = tvm.compile(module, target=tvm.target.Target(target))
            except Exception as error:  # TVM raises many types
                raise KernelBuildError(f"{where}: build failed: {type(error).__name__}: {error}") from error
            library.export_library(str(out_dir / f"{stem}.so"))
            for number, device_module in enumerate(m for m in library.mod.imports if m.kind == "cuda"):
                source = device_module.inspect_source("cuda")
                cubin = f"{stem}.{number}.cubin"
                (out_dir / cubin).write_bytes(_compile_cubin(source, target.get("arch", "sm_90")))
                cuda_sources.append({"sha256": hashlib.sha256(source.encode()).hexdigest(), "cubin": cubin})
        entries.append({"name": request.name, "key": request.key, "module": request.module,
                        "source_sha256": kernel_source_sha256(request.module), "file": f"{stem}.so",
                        "arguments": _argument_table(module["main"]), "cuda_sources": cuda_sources})
        if progress:
            print(f"[{index}/{len(unique)}] {request.name} {json.dumps(request.key, sort_keys=True)} -> {stem}.so",
                  flush=True)
    manifest = {"format": FORMAT_VERSION, "tvm_version": str(tvm.__version__), "target": target,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "description": description or {}, "kernels": entries}
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / MANIFEST_NAME)
    return manifest


def export_for_config(cfg, target_kind: str, out_dir: str | Path, arch: str = "sm_90",
                      variants: list[str] | None = None, checks: bool = True, progress: bool = True) -> dict:
    """What `run_nerf.py export-kernels` does: every kernel of cfg's model in each variant (default: all of
    configs/shiftadd/), plus the self-check's kernels, compiled for "cuda" (arch) or "llvm" (this CPU)."""
    requests, target, description = config_requests(cfg, target_kind, arch, variants, checks)
    return export_kernels(requests, target, out_dir, description=description, progress=progress)


def config_requests(cfg, target_kind: str, arch: str = "sm_90", variants: list[str] | None = None,
                    checks: bool = True) -> tuple[list[KernelRequest], dict, dict]:
    """(requests, target, manifest description) of export_for_config, without compiling anything: also what
    decides whether an existing export still serves (`export_serves`)."""
    from gnt_shiftadd.variants import variant_configs  # noqa: PLC0415 (export-only)
    from kernels.build import cpu_target  # noqa: PLC0415 (needs the compiler)

    if target_kind not in ("cuda", "llvm"):
        raise KernelBuildError(f"--target must be cuda or llvm, got {target_kind!r}")
    target = {"kind": "cuda", "arch": arch} if target_kind == "cuda" else cpu_target()
    available = variant_configs()
    unknown = sorted(set(variants or []) - set(available))
    if unknown:
        raise KernelBuildError(f"unknown variants {unknown}; configs/shiftadd/ has {sorted(available)}")
    chosen = {name: path for name, path in available.items() if variants is None or name in variants}
    skipped: dict[str, str] = {}
    per_variant: dict[str, list] = {}
    requests = model_requests(cfg, chosen, target, skipped=skipped, per_variant=per_variant)
    if target["kind"] != "llvm":  # CPU-only kernels (their make ignores the target) cannot serve this device
        for name, identities in per_variant.items():
            cpu_only = sorted({kernel for kernel, _ in identities} & CPU_ONLY_KERNELS)
            if cpu_only:
                skipped[name] = f"uses CPU-only kernels {cpu_only}"
        requests = [r for r in requests if r.name not in CPU_ONLY_KERNELS]
    requests += check_requests(target) if checks else []
    description = {"config": cfg.name, "variants": sorted(set(chosen) - set(skipped)), "skipped_variants": skipped,
                   "self_check": checks,
                   "model": {"netwidth": cfg.model.netwidth, "trans_depth": cfg.model.trans_depth,
                             "num_source_views": cfg.data.num_source_views, "n_samples": cfg.render.n_samples}}
    return requests, target, description


def export_serves(manifest: dict, requests: list[KernelRequest]) -> list[str]:
    """Why an existing export's manifest does not serve `requests` (empty: it does): kernels it lacks or whose
    kernel sources changed since it was compiled."""
    exported = {(e["name"], json.dumps(e["key"], sort_keys=True)): e for e in manifest.get("kernels", [])}
    problems = []
    for request in requests:
        entry = exported.get(request.identity())
        if entry is None:
            problems.append(f"{request.name} {request.identity()[1]} is not in the export")
        elif entry.get("source_sha256") != kernel_source_sha256(entry["module"]):
            problems.append(f"{request.name}: its kernel source changed since the export")
    return problems


# --------------------------------------------------------------------------------------------- runtime loading

def runtime_library_dir() -> Path:
    """Where libtvm_runtime*.so live: $SHIFTADD_GNT_TVM_RUNTIME, else the installed tvm package's lib/ (found
    without importing tvm, so the compiler library is never loaded)."""
    env = os.environ.get(RUNTIME_ENV)
    if env:
        return Path(env)
    if "tvm" in sys.modules and getattr(sys.modules["tvm"], "__file__", None):
        return Path(sys.modules["tvm"].__file__).parent / "lib"
    try:
        spec = importlib.util.find_spec("tvm")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "lib"
    raise AOTManifestError(f"no TVM runtime found: set {RUNTIME_ENV} to a folder with libtvm_runtime.so and VERSION "
                           "(benchmarks/prepare_gpu_carry.py makes one) or pip install apache-tvm==0.27.0.post1")


def runtime_version() -> str:
    """The TVM version of the runtime libraries: $SHIFTADD_GNT_TVM_RUNTIME/VERSION or the installed apache-tvm."""
    env = os.environ.get(RUNTIME_ENV)
    if env:
        version_file = Path(env) / "VERSION"
        if not version_file.is_file():
            raise AOTManifestError(f"{version_file} is missing: the runtime folder must say which TVM it comes from")
        return version_file.read_text().strip()
    if "tvm" in sys.modules:
        return str(sys.modules["tvm"].__version__)
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError as error:
        raise AOTManifestError(f"no TVM runtime version: set {RUNTIME_ENV} or pip install apache-tvm") from error


_RUNTIME_HANDLES: dict[str, ctypes.CDLL] = {}


def _preload_cudart() -> None:
    """libtvm_runtime_cuda.so links libcudart.so.13: make sure the one torch ships is loaded (torch's CUDA init
    normally has done it already)."""
    if torch.cuda.is_available():
        torch.cuda.init()
    for entry in sys.path:
        for path in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libcudart.so.*"))):
            with contextlib.suppress(OSError):
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return


def load_runtime(kind: str) -> Path:
    """Load the TVM runtime libraries for target kind "llvm" or "cuda" into this process (once); returns their
    folder. Never loads libtvm_compiler.so."""
    import tvm_ffi  # noqa: PLC0415 (optional TVM: only AOT loading needs it; it loads libtvm_ffi.so)

    folder = runtime_library_dir()
    for library in RUNTIME_LIBRARIES[kind]:
        if library in _RUNTIME_HANDLES:
            continue
        path = folder / library
        if not path.is_file():
            raise AOTManifestError(f"TVM runtime library {path} is missing (needed for {kind} kernels)")
        if library == "libtvm_runtime_cuda.so":
            _preload_cudart()
        try:
            _RUNTIME_HANDLES[library] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise AOTManifestError(f"cannot load the TVM runtime library {path}: {error}") from error
    if kind == "cuda" and tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        raise AOTManifestError(f"{folder / 'libtvm_runtime_cuda.so'} loaded but registered no CUDA module loader")
    return folder


_CUBINS: dict[str, Path] = {}  # sha256 of a CUDA source -> its precompiled cubin (all installed AOT folders)
_CUDA_CALLBACK: list = []


def _register_cuda_callback() -> None:
    """TVM 0.27's CUDA runtime compiles a kernel's stored CUDA source when the library loads, through the global
    "tvm_callback_cuda_compile": answer with the cubin the export made for exactly that source."""
    import tvm_ffi  # noqa: PLC0415 (optional TVM)

    if _CUDA_CALLBACK:
        return
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_from_aot(source, *rest):
        digest = hashlib.sha256(str(source).encode()).hexdigest()
        if digest in _CUBINS:
            return bytearray(_CUBINS[digest].read_bytes())
        if previous is not None:  # a process with the compiler: JIT kernels still compile as before
            return previous(source, *rest)
        raise RuntimeError(f"no precompiled cubin for a CUDA kernel source with SHA-256 {digest}: the AOT folder "
                           f"does not match this kernel library (export the kernels again)")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_from_aot, override=True)
    _CUDA_CALLBACK.append(compile_from_aot)


def runtime_target(device: torch.device) -> dict:
    """The target a device needs, computed without the compiler: {"kind": "cuda", "arch": "sm_XY"} from torch,
    {"kind": "llvm"} for the CPU (the CPU model name needs LLVM; it is compared when the compiler is present)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"kind": "cuda", "arch": f"sm_{major}{minor}"}
    if device.type == "cpu":
        target = {"kind": "llvm"}
        if "tvm" in sys.modules:  # the host CPU name needs LLVM, i.e. the compiler library
            from kernels.build import cpu_target  # noqa: PLC0415

            target["mcpu"] = cpu_target()["mcpu"]
        return target
    raise AOTManifestError(f"no AOT kernels for device {device}; they exist for cpu and cuda")


def _check_manifest(manifest: dict, path: Path, wanted: dict) -> None:
    def refuse(field: str, theirs, ours, hint: str) -> None:
        raise AOTManifestError(f"{path}: field {field!r} is {theirs!r} but {ours}; {hint}")

    redo = "export the kernels again (python run_nerf.py export-kernels ...)"
    if manifest.get("format") != FORMAT_VERSION:
        refuse("format", manifest.get("format"), f"this loader reads format {FORMAT_VERSION}", redo)
    version = runtime_version()
    if manifest.get("tvm_version") != version:
        refuse("tvm_version", manifest.get("tvm_version"), f"the TVM runtime here is {version!r}",
               redo + " with this TVM, or carry the runtime it was exported with")
    target = manifest.get("target") or {}
    for field in ("kind", "arch", "mcpu"):
        if field in wanted and field in target and target[field] != wanted[field]:
            refuse(f"target.{field}", target[field], f"this device needs {wanted[field]!r}",
                   redo + f" for target {wanted}")
        if field in wanted and field not in target and field != "mcpu":
            refuse(f"target.{field}", None, f"this device needs {wanted[field]!r}", redo)
    stale = {}
    for entry in manifest.get("kernels", []):
        module = entry.get("module", "?")
        if module not in stale:
            try:
                current = kernel_source_sha256(module)
            except ImportError:
                current = None
            stale[module] = current
        if entry.get("source_sha256") != stale[module]:
            refuse(f"kernels[{entry.get('name')}].source_sha256", entry.get("source_sha256"),
                   f"{module}'s source here hashes to {stale[module]!r} (the kernel code changed since the export)",
                   redo)


class AOTKernels:
    """The kernels of one AOT folder for one device, as a kernels.dispatch loader: (name, key, device) -> the
    kernel's `main` (a tvm_ffi.Function taking torch tensors, like a JIT-built one) or None (not exported here,
    or another device). Construction validates the manifest and loads the TVM runtime; libraries open lazily."""

    def __init__(self, directory: str | Path, device: torch.device | str = "cpu"):
        self.directory = Path(directory)
        self.device = torch.device(device)
        path = self.directory / MANIFEST_NAME
        if not path.is_file():
            raise AOTManifestError(f"{path} not found: not an AOT kernel folder (python run_nerf.py export-kernels "
                                   f"--out {self.directory} ...)")
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise AOTManifestError(f"{path} is not readable JSON: {error}") from error
        self.target = self.manifest.get("target") or {}
        _check_manifest(self.manifest, path, runtime_target(self.device))
        self.entries = {(e["name"], json.dumps(e["key"], sort_keys=True)): e for e in self.manifest["kernels"]}
        for entry in self.manifest["kernels"]:
            for part in [entry["file"]] + [c["cubin"] for c in entry.get("cuda_sources", [])]:
                if not (self.directory / part).is_file():
                    raise AOTManifestError(f"{path}: kernels[{entry['name']}] names {part}, which is missing")
        load_runtime(self.target["kind"])
        if self.target["kind"] == "cuda":
            for entry in self.manifest["kernels"]:
                for source in entry.get("cuda_sources", []):
                    _CUBINS[source["sha256"]] = self.directory / source["cubin"]
            _register_cuda_callback()
        self._functions: dict[tuple, Callable] = {}

    def __repr__(self) -> str:
        return f"AOTKernels({str(self.directory)!r}, {len(self.entries)} kernels, target {self.target})"

    def __call__(self, name: str, key: dict, device: torch.device) -> Callable | None:
        device = torch.device(device)
        if device.type != self.device.type or (device.index or 0) != (self.device.index or 0):
            return None
        identity = (name, json.dumps(key, sort_keys=True))
        entry = self.entries.get(identity)
        if entry is None:
            return None
        if identity not in self._functions:
            import tvm_ffi  # noqa: PLC0415 (optional TVM)

            try:
                self._functions[identity] = tvm_ffi.load_module(str(self.directory / entry["file"]))["main"]
            except Exception as error:  # tvm_ffi raises its own error types
                raise KernelBuildError(f"AOT kernel {name!r} {key} from {self.directory / entry['file']} failed to "
                                       f"load: {error}") from error
        return self._functions[identity]


def install(directory: str | Path, device: torch.device | str = "cpu") -> AOTKernels:
    """Validate an AOT folder and register it with the kernel facade; returns the loader."""
    loader = AOTKernels(directory, device)
    dispatch.register_kernel_loader(loader)
    return loader


_INSTALLED: dict[str, AOTKernels] = {}


def install_from_environment() -> AOTKernels | None:
    """install($SHIFTADD_GNT_AOT_KERNELS) for the folder's own target kind (cuda -> the current CUDA device)."""
    directory = os.environ.get(AOT_ENV)
    if not directory:
        return None
    if directory in _INSTALLED:  # kernels/__init__.py installs it on import; later calls get the same loader
        return _INSTALLED[directory]
    manifest = Path(directory) / MANIFEST_NAME
    kind = json.loads(manifest.read_text()).get("target", {}).get("kind") if manifest.is_file() else None
    _INSTALLED[directory] = install(directory, "cuda" if kind == "cuda" else "cpu")
    return _INSTALLED[directory]


def copy_runtime(destination: str | Path, kinds: tuple[str, ...] = ("llvm", "cuda")) -> Path:
    """Copy the TVM runtime libraries (never the compiler) and a VERSION file into `destination`: what
    $SHIFTADD_GNT_TVM_RUNTIME points at on a machine without apache-tvm."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    source = runtime_library_dir()
    for name in sorted({lib for kind in kinds for lib in RUNTIME_LIBRARIES[kind]}):
        shutil.copy2(source / name, destination / name)
    (destination / "VERSION").write_text(runtime_version() + "\n")
    return destination
