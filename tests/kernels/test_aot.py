"""Ahead-of-time kernels (kernels/aot.py): export, load in a process that cannot import TVM's compiler, identical
outputs to the JIT-built kernels, refusal of a manifest from another TVM version, target or kernel source."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

from conftest import REPO_ROOT  # noqa: E402
from kernels import aot  # noqa: E402
from kernels.build import cpu_target  # noqa: E402
from kernels.selfcheck import ffn_checks, mat_shift_checks  # noqa: E402
from kernels.view_attention import kernel_tile  # noqa: E402

EXPORTED = {"mat_shift", "ffn_sublayer"}

# runs in a fresh interpreter where `import tvm` fails, as on a machine with only the TVM runtime
CHILD = textwrap.dedent("""
    import runpy, sys
    runpy.run_path("benchmarks/no_tvm_compiler.py")
    import torch
    from kernels.aot import install_from_environment
    from kernels.selfcheck import ffn_checks, mat_shift_checks
    assert install_from_environment() is not None
    checks = mat_shift_checks(torch.device("cpu"), 17, torch.float32) + ffn_checks(torch.device("cpu"), 17, "dense")
    maps = open("/proc/self/maps").read()
    torch.save({"outputs": {c.label: (c.got, c.ran, c.error()) for c in checks},
                "compiler_loaded": "libtvm_compiler" in maps, "runtime_loaded": "libtvm_runtime.so" in maps,
                "tvm_imported": "tvm" in sys.modules}, sys.argv[1])
""")


@pytest.fixture(scope="module")
def llvm_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot")
    target = cpu_target()
    requests = [r for r in aot.check_requests(target) if r.name in EXPORTED and r.key.get("dtype") != "float16"
                and r.key.get("experts", 1) == 1]
    manifest = aot.export_kernels(requests, target, root / "kernels", description={"test": True}, progress=False)
    runtime = aot.copy_runtime(root / "runtime", kinds=("llvm",))
    return root / "kernels", runtime, manifest


def test_manifest_names_every_kernel_with_symbolic_shapes(llvm_export):
    folder, _, manifest = llvm_export
    on_disk = json.loads((folder / aot.MANIFEST_NAME).read_text())
    assert on_disk == manifest and manifest["format"] == aot.FORMAT_VERSION
    assert manifest["tvm_version"] == aot.runtime_version() and manifest["target"]["kind"] == "llvm"
    assert sorted(e["name"] for e in manifest["kernels"]) == sorted(EXPORTED)
    for entry in manifest["kernels"]:
        assert (folder / entry["file"]).is_file() and entry["cuda_sources"] == []
        assert entry["source_sha256"] == aot.kernel_source_sha256(entry["module"])
        token_dims = {a["shape"][0] for a in entry["arguments"] if a["shape"] and isinstance(a["shape"][0], str)}
        assert token_dims, f"{entry['name']}: the token dimension must stay symbolic"


def test_loads_without_the_compiler_and_matches_the_jit_kernels_bit_for_bit(llvm_export, tmp_path):
    folder, runtime, _ = llvm_export
    out = tmp_path / "child.pt"
    env = {**os.environ, aot.AOT_ENV: str(folder), aot.RUNTIME_ENV: str(runtime),
           "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(out)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    child = torch.load(out)
    assert not child["compiler_loaded"] and not child["tvm_imported"] and child["runtime_loaded"]
    jit = mat_shift_checks(torch.device("cpu"), 17, torch.float32) + ffn_checks(torch.device("cpu"), 17, "dense")
    assert len(child["outputs"]) == len(jit) == 2
    for check in jit:
        got, ran, error = child["outputs"][check.label]
        assert set(ran.values()) == {"tvm"} and set(check.ran.values()) == {"tvm"}, (ran, check.ran)
        assert error is None
        assert got.dtype == check.got.dtype and torch.equal(got.view(torch.uint8), check.got.view(torch.uint8))


def _edited_copy(folder: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / aot.MANIFEST_NAME).read_text())
    edit(manifest)
    (copy / aot.MANIFEST_NAME).write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("field, edit", [
    ("tvm_version", lambda m: m.update(tvm_version="0.26.0")),
    ("target.kind", lambda m: m.update(target={"kind": "cuda", "arch": "sm_90"})),
    ("target.mcpu", lambda m: m["target"].update(mcpu="not-this-cpu")),
    ("source_sha256", lambda m: m["kernels"][0].update(source_sha256="0" * 64)),
    ("format", lambda m: m.update(format=99)),
])
def test_a_manifest_from_another_tvm_target_or_source_is_refused(llvm_export, tmp_path, field, edit):
    folder, _, _ = llvm_export
    with pytest.raises(aot.AOTManifestError, match=field.replace(".", r"\.")):
        aot.AOTKernels(_edited_copy(folder, tmp_path, edit), "cpu")


def test_a_missing_manifest_or_library_is_named(llvm_export, tmp_path):
    folder, _, manifest = llvm_export
    with pytest.raises(aot.AOTManifestError, match="manifest.json not found"):
        aot.AOTKernels(tmp_path, "cpu")
    copy = _edited_copy(folder, tmp_path, lambda m: None)
    (copy / manifest["kernels"][0]["file"]).unlink()
    with pytest.raises(aot.AOTManifestError, match="missing"):
        aot.AOTKernels(copy, "cpu")


def test_an_export_serves_only_the_requests_it_holds_from_current_sources(llvm_export):
    """What benchmarks/prepare_gpu_carry.py checks before reusing an export: a kernel added to the model since (the
    carry once reused an export that lacked the new view-blend kernel) or an edited kernel source means rebuild."""
    _, _, manifest = llvm_export
    target = cpu_target()
    held = [r for r in aot.check_requests(target) if r.name in EXPORTED and r.key.get("dtype") != "float16"
            and r.key.get("experts", 1) == 1]
    assert aot.export_serves(manifest, held) == []
    added = [r for r in aot.check_requests(target) if r.name == "view_blend"]
    assert added and any("view_blend" in p and "not in the export" in p for p in aot.export_serves(manifest, held + added))
    edited = json.loads(json.dumps(manifest))
    edited["kernels"][0]["source_sha256"] = "0" * 64
    assert any("source changed" in p for p in aot.export_serves(edited, held))


def test_the_loader_answers_only_its_kernels_and_device(llvm_export):
    folder, _, manifest = llvm_export
    loader = aot.AOTKernels(folder, "cpu")
    entry = manifest["kernels"][0]
    assert loader(entry["name"], entry["key"], torch.device("cpu")) is not None
    assert loader(entry["name"], {**entry["key"], "unknown": 1}, torch.device("cpu")) is None
    assert loader(entry["name"], entry["key"], torch.device("meta")) is None


def test_model_requests_cover_every_kernel_of_the_variants(tiny_config):
    cfg = tiny_config()
    variants = {name: REPO_ROOT / "configs" / "shiftadd" / f"{name}.yaml"
                for name in ("a_dense", "c_hash_shift_linears", "e_moe")}
    requests = aot.model_requests(cfg, variants, target={"kind": "cuda", "arch": "sm_90"}, rays=4)
    names = {r.name for r in requests}
    assert {"view_features", "view_attention", "ffn_sublayer", "mat_shift", "hash_pack",
            "hashed_quadratic"} <= names, names
    assert {r.key["experts"] for r in requests if r.name == "ffn_sublayer"} == {1, 2}
    assert "ray_attention" not in names  # CPU-only: a CUDA model keeps the per-core kernels (recorded above)
    for r in requests:
        if r.name == "view_attention":  # recorded on CPU tensors, keyed as a CUDA device asks
            assert r.key["tile"] == kernel_tile("cuda", r.key["views"], r.key["channels"])
        if r.name in ("hash_pack", "hashed_quadratic"):
            assert r.key.get("samples", r.key.get("queries")) == cfg.render.n_samples


def test_cpu_model_requests_use_the_fused_ray_attention(tiny_config):
    variants = {"c_hash_shift_linears": REPO_ROOT / "configs" / "shiftadd" / "c_hash_shift_linears.yaml"}
    names = {r.name for r in aot.model_requests(tiny_config(), variants, target={"kind": "llvm"}, rays=4)}
    assert "ray_attention" in names and "hashed_quadratic" not in names, names


def _nvrtc_ready() -> bool:
    try:
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError:
        return False
    return aot._cuda_path() is not None


@pytest.mark.skipif(not _nvrtc_ready(), reason="CUDA export needs NVRTC (cuda-bindings) and the CUDA headers")
def test_cuda_export_ships_a_cubin_for_exactly_the_stored_source(tmp_path):
    target = {"kind": "cuda", "arch": "sm_90"}
    requests = [r for r in aot.check_requests(target) if r.name == "mat_shift" and r.key["dtype"] == "float32"]
    manifest = aot.export_kernels(requests, target, tmp_path, progress=False)
    (entry,) = manifest["kernels"]
    library = (tmp_path / entry["file"]).read_bytes()
    assert entry["cuda_sources"], "a CUDA export must carry its compiled device code"
    for source in entry["cuda_sources"]:
        cubin = (tmp_path / source["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF"  # a device binary: the GPU machine needs no NVRTC
        # TVM 0.27 stores the CUDA source in the library (length-prefixed, little-endian u64) and compiles it at
        # load time: the loader's callback answers with this cubin for the SHA-256 of exactly that stored text
        start = library.find(b"\n#ifdef __CUDACC_RTC__")
        assert start > 8
        stored = library[start:start + int.from_bytes(library[start - 8:start], "little")]
        assert stored.rstrip().endswith(b"}") and hashlib.sha256(stored).hexdigest() == source["sha256"]
