"""Checkpoints: written atomically, self-describing (step and model configuration inside), checked on load."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from gnt_shiftadd.config import Config, config_from_dict, model_signature

FORMAT = "shiftadd-gnt/checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to another model: the message says which and why."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, cfg: Config, model, optimizer=None, scheduler=None, step: int = 0) -> Path:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "step": int(step),
        "model_signature": model_signature(cfg),
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a ShiftAdd-GNT checkpoint (expected format {FORMAT!r})")
    payload["model"] = _renamed_head_keys(payload["model"])
    return payload


def _renamed_head_keys(state: dict) -> dict:
    """Checkpoints written before the colour head became its own module (models/heads.py) kept its layers as
    transformer.norm / transformer.rgb_fc: map them to transformer.head.* so those runs still load."""
    old = ("transformer.norm.", "transformer.rgb_fc.")
    if not any(k.startswith(old) for k in state):
        return state
    return {("transformer.head." + k[len("transformer."):] if k.startswith(old) else k): v for k, v in state.items()}


def check_compatible(payload: dict, cfg: Config, path: str | Path) -> None:
    """Refuse a checkpoint whose model configuration differs from the one being built, naming the keys."""
    expected = model_signature(cfg)
    # checkpoints written before the shiftadd section existed are dense GNTs
    found = {k: v for k, v in model_signature(Config()).items() if k.startswith("shiftadd.")}
    found |= payload.get("model_signature", {})
    diffs = [f"{_key_name(k)}: checkpoint has {found.get(k)!r}, config has {v!r}"
             for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with a different model configuration:\n  " + "\n  ".join(diffs))


def _key_name(key: str) -> str:
    return key if "." in key else f"model.{key}"


def load_checkpoint(path, cfg: Config, model, optimizer=None, scheduler=None, restore_rng: bool = False) -> int:
    """Load weights (and optionally optimizer, scheduler, RNG) into existing objects; returns the saved step."""
    payload = read_checkpoint(path)
    check_compatible(payload, cfg, path)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {err}") from None
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return int(payload["step"])


def config_of_checkpoint(path) -> Config:
    """The full configuration a checkpoint was trained with (for eval/render without repeating it)."""
    return config_from_dict(read_checkpoint(path)["config"])
