import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

FERN_DIR = REPO_ROOT.parent / "shared" / "data" / "nerf_llff_data" / "fern"


@pytest.fixture
def fern_dir() -> Path:
    """The real LLFF fern scene beside the checkout (CI has ../shared); tests skip without it."""
    if not (FERN_DIR / "poses_bounds.npy").is_file():
        pytest.skip(f"real fern scene not found at {FERN_DIR}")
    return FERN_DIR


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module (the scripts are not a package), registered in sys.modules so
    their dataclasses resolve annotations."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_overrides(scene_dir: Path, run_root: Path, name: str = "tiny") -> list[str]:
    """A very small GNT (seconds per dozens of steps on CPU), with dropout on so RNG state matters."""
    return [
        f"name={name}", f"out_dir={run_root}", f"data.scene={scene_dir}", "data.factor=4",
        "data.num_source_views=3", "model.netwidth=16", "model.trans_depth=2", "model.num_heads=2",
        "model.feature_channels=8", "model.resnet_layers=[1,1,1]", "model.resnet_base_channels=8",
        "model.pos_freqs=4", "model.dir_freqs=2", "model.dropout=0.1", "render.n_samples=8", "render.chunk_rays=512",
        "train.n_rand=32", "train.steps=6", "train.val_every=3", "train.ckpt_every=3", "train.log_every=1",
        "train.val_stride=4", "eval.stride=2", "eval.lpips=false", "video.frames=2", "video.stride=4",
    ]


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory) -> Path:
    """The procedural scene at a small size, generated once per test session."""
    from data.synthetic import make_synthetic_scene

    root = tmp_path_factory.mktemp("scenes") / "synthetic"
    make_synthetic_scene(root, num_views=12, height=36, width=48, factor=4, seed=0)
    return root


@pytest.fixture
def tiny_config(tiny_scene, tmp_path):
    from gnt_shiftadd.config import load_config

    def make(*extra: str, name: str = "tiny"):
        return load_config(None, tiny_overrides(tiny_scene, tmp_path / "runs", name) + list(extra))

    return make


@pytest.fixture(scope="session", autouse=True)
def fresh_kernel_cache(tmp_path_factory):
    """Kernels build into a fresh cache directory per session, so a stale cache can never hide a bug."""
    previous = os.environ.get("SHIFTADD_GNT_KERNEL_CACHE")
    os.environ["SHIFTADD_GNT_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("tvm_kernel_cache"))
    yield
    if previous is None:
        os.environ.pop("SHIFTADD_GNT_KERNEL_CACHE", None)
    else:
        os.environ["SHIFTADD_GNT_KERNEL_CACHE"] = previous


@pytest.fixture
def failing_kernel_builds(monkeypatch):
    """Every kernel build fails with KernelBuildError("... <message>"), nothing memoised from earlier tests:
    call it with the message a fallback test then expects in its one warning."""
    from kernels.build import KernelBuildError

    def install(message: str) -> None:
        def failing_build(name, key, target, make):
            raise KernelBuildError(f"kernel {name!r} {key}: build failed: {message}")

        monkeypatch.setattr("kernels.dispatch.build_kernel", failing_build)  # every kernel is built through it
        monkeypatch.setattr("kernels.dispatch._MEMO", {})

    return install


def pytest_collection_modifyitems(items):
    """In kernel tests a silent fallback to the reference would hide a broken kernel: make it an error (tests of
    the fallback itself catch the warning with pytest.warns). One conftest for all tests: a second one in
    tests/kernels/ would shadow this module for `from conftest import ...`."""
    for item in items:
        if "tests/kernels" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings("error:.*falling back.*:RuntimeWarning"))


@pytest.fixture
def dense(tiny_config):
    """(cfg, a dense tiny GNT in eval mode without dropout, its scene's tensors): what the ShiftAdd conversions
    start from."""
    import torch

    from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene

    cfg = tiny_config("model.dropout=0.0")
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    model = build_model(cfg, torch.device("cpu")).eval()
    return cfg, model, tensors
