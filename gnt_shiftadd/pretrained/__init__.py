"""Pretrained models that ship with the project: a cross-scene GNT that renders a new capture without training.

Each model is a weights-only checkpoint (the project's checkpoint format, no optimizer state) beside a JSON record
of how it was made (training command, scenes seen, steps, commit, sha256). `resolve_checkpoint("pretrained")`
gives the newest one; `run_nerf.py eval|render --ckpt pretrained --scene DIR` renders with it and
`run_nerf.py train --init pretrained` fine-tunes from it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from gnt_shiftadd.training.checkpoint import FORMAT, CheckpointError, read_checkpoint

PRETRAINED_DIR = Path(__file__).resolve().parent
DEFAULT_NAME = "gnt_llff_cpu_v3"  # the model `pretrained` means (v1, v2 still ship: `--init gnt_llff_cpu_v2`)
ALIASES = ("pretrained",)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def available(folder: Path = PRETRAINED_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.pt") if (folder / f"{p.stem}.json").is_file())


def record_of(name: str, folder: Path = PRETRAINED_DIR) -> dict:
    path = folder / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"pretrained model {name!r} has no record {path}; available: {available(folder) or 'none'}")
    return json.loads(path.read_text())


def resolve_checkpoint(name_or_path: str | Path, folder: Path = PRETRAINED_DIR) -> Path:
    """'pretrained' (the default model), a shipped model's name, or a checkpoint path -> a checkpoint path.

    A shipped model is checked against the sha256 in its record, so a truncated or swapped file is refused."""
    text = str(name_or_path)
    name = DEFAULT_NAME if text in ALIASES else text
    path = folder / f"{name}.pt"
    if text in ALIASES or (path.is_file() and not Path(text).suffix):
        if not path.is_file():
            raise CheckpointError(f"the pretrained model {path} is missing from this installation "
                                  f"(available: {available(folder) or 'none'})")
        expected = record_of(name, folder).get("sha256")
        if expected != sha256_of(path):
            raise CheckpointError(f"pretrained model {path} does not match the sha256 in {folder / (name + '.json')}: "
                                  f"the file is damaged or was replaced")
        return path
    return Path(name_or_path)


def export_pretrained(checkpoint: str | Path, name: str, record: dict, folder: Path = PRETRAINED_DIR) -> Path:
    """Write `checkpoint`'s weights and config (no optimizer, scheduler or RNG) as the shipped model `name`, and its
    record (what it was trained on and how, plus the file's sha256) as `name`.json."""
    payload = read_checkpoint(checkpoint)
    slim = {"format": FORMAT, "step": payload["step"], "model_signature": payload["model_signature"],
            "config": payload["config"], "model": payload["model"], "optimizer": None, "scheduler": None,
            "rng": payload["rng"]}
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.pt"
    torch.save(slim, out)
    full = {"name": name, "step": payload["step"], **record, "sha256": sha256_of(out), "bytes": out.stat().st_size}
    (folder / f"{name}.json").write_text(json.dumps(full, indent=2) + "\n")
    return out
