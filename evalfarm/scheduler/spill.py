"""The embedded runner's private directories for its shards' partial files, and the sweep of those left
behind by a run that was killed (at a million samples they hold gigabytes).

A run holds an exclusive `flock` on its directory's lock file for its whole life. The kernel drops the lock
when the process dies however it dies, so a directory whose lock can be taken belongs to no live run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_LOCK = ".lock"
_UNLOCKED_GRACE_S = 3600.0  #: a directory without its lock file this old was left by a run killed at birth


@contextlib.contextmanager
def spill_directory(root: Path) -> Iterator[str]:
    """A new directory under `root`, locked while the block runs and removed after it; the directories of
    dead runs under `root` are removed first."""
    root.mkdir(parents=True, exist_ok=True)
    sweep(root)
    path = Path(tempfile.mkdtemp(prefix="partials-", dir=root))
    fd = os.open(path / f"{_LOCK}.new", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(path / f"{_LOCK}.new", path / _LOCK)  # a sweep sees the lock file only once it is held
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep(root: Path) -> list[Path]:
    """Remove the directories under `root` that no live run holds; returns them."""
    removed = []
    for path in sorted(root.glob("partials-*")):
        try:
            fd = os.open(path / _LOCK, os.O_RDWR)
        except FileNotFoundError:  # being created this instant, or its run was killed before it locked
            if time.time() - path.stat().st_mtime > _UNLOCKED_GRACE_S:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live run's
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
