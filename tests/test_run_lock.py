"""Two runs started into the same run folder at once: the second is refused, nothing of the first is touched."""
import subprocess
import sys

import pytest

from gnt_shiftadd.training.checkpoint import CheckpointError
from gnt_shiftadd.training.run_lock import run_folder_lock
from gnt_shiftadd.training.trainer import train

HOLD_LOCK = """
import sys, time
from gnt_shiftadd.training.run_lock import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_run_into_a_locked_folder_is_refused(tiny_config):
    cfg = tiny_config()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cfg.run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"is in use by another run \(pid {holder.pid}, started .*\); wait"):
            train(cfg, progress=False)
        assert not (cfg.run_dir / "checkpoints").exists() and not (cfg.run_dir / "tensorboard").exists()
    finally:
        holder.kill()
        holder.wait()
    with run_folder_lock(cfg.run_dir):  # the lock died with its process: the folder is free again
        pass


def test_lock_is_exclusive_within_a_process_and_released_on_exit(tmp_path):
    with run_folder_lock(tmp_path / "run"):
        with pytest.raises(CheckpointError, match="is in use by another run"):
            with run_folder_lock(tmp_path / "run"):
                pass
    with run_folder_lock(tmp_path / "run"):
        pass
    with run_folder_lock(tmp_path / "run", enabled=False):  # DDP ranks > 0 do not take it
        pass
