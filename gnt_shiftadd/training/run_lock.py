"""One run per run folder at a time: an exclusive advisory lock (flock) on <run_dir>/.run.lock.

Two `train` processes started into the same folder would interleave checkpoints and TensorBoard events; the
second one is refused instead. The lock belongs to the open file, so it disappears when its process ends (also
when it is killed): a stale lock file never blocks a later run.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from gnt_shiftadd.training.checkpoint import CheckpointError

LOCK_NAME = ".run.lock"


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, enabled: bool = True):
    """Hold the run folder's lock for the duration of the block (no-op when not enabled, e.g. DDP ranks > 0)."""
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise CheckpointError(f"{run_dir} is in use by another run ({holder}); wait for it to finish or choose "
                                  f"another name=... / out_dir=... (nothing was touched)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock
