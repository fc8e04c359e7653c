"""Data-parallel training with 2 CPU processes (gloo), launched by torchrun exactly as a user would."""
import os
import subprocess
import sys

import torch

from conftest import REPO_ROOT, tiny_overrides
from gnt_shiftadd.training.checkpoint import read_checkpoint

WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from gnt_shiftadd.config import load_config
from gnt_shiftadd.training.trainer import train
cfg = load_config(None, {overrides!r})
result = train(cfg, progress=False)
rank = int(__import__("os").environ["RANK"])
torch.save({{k: v for k, v in result.model.state_dict().items()}}, {out!r} + f"/rank{{rank}}.pt")
"""


def test_two_process_gloo_training_keeps_replicas_in_sync(tiny_scene, tmp_path):
    overrides = tiny_overrides(tiny_scene, tmp_path / "runs", "ddp") + ["train.steps=4", "device=cpu"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO_ROOT), overrides=overrides, out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients were all-reduced
    ckpt = read_checkpoint(tmp_path / "runs" / "ddp" / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 4
    assert all(torch.equal(ckpt["model"][k], rank0[k]) for k in rank0)
