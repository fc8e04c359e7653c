"""The kernel facade: the one way every kernel module gets, runs and reports a compiled TVM kernel.

Every kernel module (mat_shift, ffn, view_features, view_attention, hashed_attention) goes through this file, so
TVM availability, where a compiled kernel comes from, the token tail, the autograd check and the fallback to the
PyTorch reference are decided in one place.

Getting a kernel
  get_kernel(name, key, device, make) -> Callable | None
      The compiled `main` of kernel `name` for the static shapes `key` (a JSON-able dict) on `device`, or None
      when the reference must run (TVM not importable, a device without a TVM target, a failed build: one warning
      each, naming the kernel). Sources, asked in this order:
        1. the registered loaders (see below): prebuilt libraries, e.g. ahead-of-time (AOT) compiled ones;
        2. kernels.build.build_kernel: the on-disk cache, else compile `make(target) -> tvm.IRModule` and cache it.
      Memoised per process on (name, key, device, torch threads, cache dir, loaders), so the per-call cost on the
      render path is one dict lookup.
  register_kernel_loader(loader) / unregister_kernel_loader(loader)
      loader(name: str, key: dict, device: torch.device) -> Callable | None: return a ready kernel for exactly this
      (name, key, device), or None to pass. A loader that raises KernelBuildError is warned about once and skipped.
      Registering or removing a loader clears the memo. Loaders are asked even when the TVM compiler is absent
      (a prebuilt library needs only the TVM runtime).

The one tail rule (token-tiled kernels: the tile count is symbolic, the tile size static)
  run_tiled(launch, tile, tokens, inputs, outputs, token_dims=None)
      The tile-aligned prefix runs in place on the caller's tensors (no copies); the last tokens % tile tokens run
      as one more tile, zero-padded, and only their real outputs are copied back. Zero tokens must be harmless to
      the kernel (they are: a zero row normalises to the bias, a zero mask means "no view sees this token").

One autograd check and one weight helper
  needs_grad(*tensors)   True when autograd wants gradients of any input: the kernels have no backward, so such a
                         call runs the differentiable reference.
  linear_weight(layer)   fp32 weight [out, in] of an nn.Linear or a ShiftLinear (decoded: exact +-2^k or 0);
                         ValueError for a ShiftLinear with fixed-point inputs (no kernel rounds its inputs).

What actually ran (a timing can never be wrong about what ran)
  note_kernel(name, how)        how in {"tvm", "blas", "reference"}; get_kernel notes "tvm"/"reference" itself.
  recording(record)             context manager: notes made inside go into the dict `record` ({name: how}).
  KernelLeaf                    base class of the kernel-backed modules: `self.kernels_ran` records its last call.
  kernel_map(model)             {module path: {kernel: how}} over the model's kernel-backed modules.
  require_all_kernels(model)    raises KernelFallbackError naming every module whose last call ran the reference
                                (or that `use_kernels_` left on the reference), and returns kernel_map(model).
  all_kernels_required(model)   context manager: clears the records, runs the block, then require_all_kernels.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import warnings
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from gnt_shiftadd.shiftadd.int_shift import IntegerLayerError
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear
from kernels.build import KernelBuildError, build_kernel, match_tvm_threads_to_torch, target_for, tvm_available

__all__ = ["KERNEL_BACKENDS", "KernelNotApplicable", "resolve_backend", "warn_once", "get_kernel", "register_kernel_loader",
           "unregister_kernel_loader", "run_tiled", "needs_grad", "linear_weight", "note_kernel", "recording",
           "KernelLeaf", "KernelFallbackError", "kernel_map", "require_all_kernels", "all_kernels_required"]

KERNEL_BACKENDS = ("torch", "tvm", "auto")  # auto: tvm where TVM is importable, else torch (one warning)
_WARNED: set[str] = set()
_LOADERS: list[Callable] = []
_MEMO: dict[tuple, Callable | None] = {}
_RECORD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("shiftadd_gnt_kernel_record", default=None)


class KernelNotApplicable(ValueError):
    """A kernel handler's answer "this fused kernel does not cover that module here (e.g. not on this device, or
    another core); swap its parts instead". Not a fallback: use_kernels_ descends into the module silently."""


class KernelFallbackError(RuntimeError):
    """Something that had to run on the compiled kernels ran on the PyTorch reference (the message names it)."""


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(requested: str) -> str:
    """"torch" or "tvm"; "tvm" and "auto" degrade to "torch" (with one warning) when TVM is not importable and
    no kernel loader is registered (prebuilt AOT kernels need only the TVM runtime: kernels/aot.py)."""
    if requested not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {requested!r}")
    if requested in ("tvm", "auto") and not tvm_available() and not _LOADERS:
        warn_once(f"kernels={requested} requested but TVM is not importable (pip install apache-tvm==0.27.0.post1); "
                  "using the PyTorch reference kernels")
        return "torch"
    return "torch" if requested == "torch" else "tvm"


# ----------------------------------------------------------------------------------------------- getting kernels

def register_kernel_loader(loader: Callable) -> None:
    """Ask `loader(name, key, device) -> Callable | None` for a prebuilt kernel before building one."""
    if loader not in _LOADERS:
        _LOADERS.append(loader)
    _MEMO.clear()


def unregister_kernel_loader(loader: Callable) -> None:
    if loader in _LOADERS:
        _LOADERS.remove(loader)
    _MEMO.clear()


def _find_kernel(name: str, key: dict, device: torch.device, make: Callable) -> Callable | None:
    match_tvm_threads_to_torch()  # before the first kernel runs: TVM's pool is sized once
    for loader in list(_LOADERS):
        try:
            kernel = loader(name, key, device)
        except KernelBuildError as error:
            warn_once(f"{error}; this kernel loader is skipped")
            continue
        if kernel is not None:
            return kernel
    if not tvm_available():
        warn_once(f"{name}: TVM is not importable (pip install apache-tvm==0.27.0.post1); falling back to the "
                  "PyTorch reference for this kernel")
        return None
    try:
        return build_kernel(name, key, target_for(device), make)
    except KernelBuildError as error:
        warn_once(f"{error}; falling back to the PyTorch reference for this kernel")
        return None


def get_kernel(name: str, key: dict, device: torch.device | str, make: Callable) -> Callable | None:
    """The compiled kernel `name` for shapes `key` on `device`, or None (after one warning) if the reference must
    run. `make(target) -> tvm.IRModule` builds it when no loader and no disk cache has it. Notes what will run."""
    device = torch.device(device)
    memo = (name, json.dumps(key, sort_keys=True), device.type, device.index, torch.get_num_threads(),
            os.environ.get("SHIFTADD_GNT_KERNEL_CACHE"))
    if memo not in _MEMO:
        _MEMO[memo] = _find_kernel(name, key, device, make)
    kernel = _MEMO[memo]
    note_kernel(name, "tvm" if kernel is not None else "reference")
    return kernel


# ------------------------------------------------------------------------------------------------ the tail rule

def _tail(tensor: torch.Tensor, dim: int, start: int, tile: int) -> torch.Tensor:
    """A zero tensor with `tile` entries along `dim` holding tensor's entries from `start` on."""
    shape = list(tensor.shape)
    shape[dim] = tile
    padded = tensor.new_zeros(shape)
    rest = tensor.shape[dim] - start
    padded.narrow(dim, 0, rest).copy_(tensor.narrow(dim, start, rest))
    return padded


def run_tiled(launch: Callable, tile: int, tokens: int, inputs: Sequence[torch.Tensor],
              outputs: Sequence[torch.Tensor], token_dims: Sequence[int] | None = None,
              inputs_longer_ok: bool = False) -> None:
    """Run a token-tiled kernel over `tokens` tokens: launch(inputs, outputs) once on the tile-aligned prefix and
    once on the zero-padded last partial tile. `outputs` hold the tokens along dim 0 and are written (the prefix
    as views, the tail copied back); launch reshapes them to [NT, tile, ...] itself. Inputs hold the tokens along
    token_dims (default 0). For the prefix they are narrowed in place (views, no copies), or, with
    `inputs_longer_ok` (kernels whose inputs carry their own symbolic token count N >= NT * tile and read only
    the first NT * tile tokens), passed whole."""
    dims = list(token_dims) if token_dims is not None else [0] * len(inputs)
    whole = tokens - tokens % tile
    if whole:
        launch([x if inputs_longer_ok else x.narrow(d, 0, whole) for x, d in zip(inputs, dims)],
               [out[:whole] for out in outputs])
    if whole < tokens:
        rest = tokens - whole
        tails = [out.new_empty((tile, *out.shape[1:])) for out in outputs]
        launch([_tail(x, d, whole, tile) for x, d in zip(inputs, dims)], tails)
        for out, tail in zip(outputs, tails):
            out[whole:] = tail[:rest]


# ---------------------------------------------------------------------------------------- autograd and weights

def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd wants gradients through this call (then the differentiable reference must run)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The dense fp32 weight [out, in] of an nn.Linear or a ShiftLinear (decoded shifts: exact +-2^k or 0).

    ValueError for a ShiftLinear with fixed_point_bits > 0: it rounds its inputs to fixed point, which no kernel
    reproduces, so its caller must stay on the reference. TypeError for any other layer type."""
    if isinstance(layer, ShiftLinear):
        if layer.spec.fixed_point_bits:
            raise ValueError(f"{layer} rounds its inputs to fixed point (fixed_point_bits="
                             f"{layer.spec.fixed_point_bits}), which the kernels do not reproduce")
        if getattr(layer, "activation_bits", 0):  # an IntShiftLinear: runs only on its own integer kernel
            raise IntegerLayerError(f"{layer} has {layer.activation_bits}-bit integer activations: it runs on the "
                                    "integer shift kernel (kernels/int_shift.py), not inside a fused fp32 kernel")
        return layer.effective_weight().detach().float()
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float()
    raise TypeError(f"kernel layers must be nn.Linear or ShiftLinear, got {type(layer).__name__}")


# ------------------------------------------------------------------------------------------------ what ran where

def note_kernel(name: str, how: str) -> None:
    """Record that kernel `name` ran as `how` ("tvm", "blas" or "reference") in the active recording, if any."""
    if torch.compiler.is_compiling():  # traced code keeps no Python-side record (see KernelLeaf)
        return
    record = _RECORD.get()
    if record is not None:
        previous = record.get(name)
        # within one call, a reference run of a kernel outweighs its tvm runs (e.g. a chunk that fell back)
        record[name] = "reference" if "reference" in (previous, how) else how


@contextlib.contextmanager
def recording(record: dict) -> Iterator[dict]:
    """Notes made inside go into `record` ({kernel name: how}); nests (the innermost recording wins)."""
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


class KernelLeaf(nn.Module):
    """Base of the kernel-backed modules that `use_kernels_` swaps in: `kernels_ran` holds what the module ran
    since its record was last cleared ({kernel name: "tvm" | "blas" | "reference"}; a reference run of a kernel
    is never overwritten by a later tvm run); subclasses implement `run` instead of `forward`."""

    def __init__(self):
        super().__init__()
        self.kernels_ran: dict[str, str] = {}

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # under torch.compile the leaf traces as its ops; nothing is recorded
            return self.run(*args, **kwargs)
        with recording(self.kernels_ran):
            return self.run(*args, **kwargs)

    def run(self, *args, **kwargs):
        raise NotImplementedError


def kernel_map(model: nn.Module) -> dict[str, dict[str, str]]:
    """{module path: {kernel: how}} of what each kernel-backed module of `model` ran since its record was
    cleared (see all_kernels_required); modules
    left on the reference when the kernels were swapped in appear as {"module": "reference"}."""
    result = {name or type(model).__name__: dict(module.kernels_ran)
              for name, module in model.named_modules() if isinstance(module, KernelLeaf)}
    for name in getattr(model, "kernel_skipped", ()):
        result[name] = {"module": "reference"}
    return result


def require_all_kernels(model: nn.Module) -> dict[str, dict[str, str]]:
    """kernel_map(model), or KernelFallbackError naming every module that ran a reference (a fallback,
    a call that needed gradients) or that stayed on the reference at swap time, or if no kernel ran at all."""
    mapping = kernel_map(model)
    fallen = sorted(f"{module}: {kernel}" for module, kernels in mapping.items()
                    for kernel, how in kernels.items() if how == "reference")
    if fallen:
        raise KernelFallbackError("these ran on the PyTorch reference instead of the kernels: " + ", ".join(fallen))
    if not any(mapping.values()):
        raise KernelFallbackError("no kernel-backed module ran (were the kernels swapped in, and the model called?)")
    return mapping


@contextlib.contextmanager
def all_kernels_required(model: nn.Module) -> Iterator[dict]:
    """Clears the records, runs the block, then checks require_all_kernels; yields the dict that then holds the
    kernel map."""
    for module in model.modules():
        if isinstance(module, KernelLeaf):
            module.kernels_ran = {}
    mapping: dict = {}
    yield mapping
    mapping.update(require_all_kernels(model))
