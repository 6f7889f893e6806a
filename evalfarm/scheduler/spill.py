"""The embedded runner's private directories for its shards' partial files, and the sweep of those left
behind by a run that was killed (at a million samples they hold gigabytes).

A run holds an exclusive `flock` on its directory's lock file for its whole life. The kernel drops the lock
when the process dies however it dies, so a directory whose lock can be taken belongs to no live run. The
directories are named by host, and a run sweeps only its own host's: on a home shared over NFS, a lock may
be local to each client. Where the filesystem has no locks, nothing is swept and runs go on unlocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

_LOCK = ".lock"

log = logging.getLogger(__name__)


def _prefix() -> str:
    return f"partials-{socket.gethostname()}-"


@contextlib.contextmanager
def spill_directory(root: Path) -> Iterator[str]:
    """A new directory under `root`, locked while the block runs and removed after it; the directories of
    dead runs under `root` are removed first."""
    root.mkdir(parents=True, exist_ok=True)
    sweep(root)
    path = Path(tempfile.mkdtemp(prefix=_prefix(), dir=root))
    fd = os.open(path / f"{_LOCK}.new", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # no locks on this filesystem: unlocked, and never swept (see `sweep`)
            log.warning("cannot lock %s (%s); it is removed at the end of this run only", path, exc)
        else:
            os.rename(path / f"{_LOCK}.new", path / _LOCK)  # a sweep sees the lock file only once it is held
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep(root: Path) -> list[Path]:
    """Remove the directories under `root` that no live run holds; returns them."""
    removed = []
    for path in sorted(root.glob(f"{_prefix()}*")):
        try:
            fd = os.open(path / _LOCK, os.O_RDWR)
        except OSError:  # being created this instant, unlockable, gone meanwhile (swept by another run)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live run (or no locks here): left alone
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
