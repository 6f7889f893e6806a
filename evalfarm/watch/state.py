"""What a watcher remembers across restarts: each set it submitted (its idempotency key, its job, how it
ended) and the signatures of the last poll. One JSON file, replaced atomically, held under an exclusive
lock so that a second watcher on the same run refuses to start rather than submit twice."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evalfarm.atomic import atomic_write
from evalfarm.errors import EvalfarmError
from evalfarm.states import _State

STATE_VERSION = 1

class SetState(_State):
    """A set's life in the watcher: submitted (the farm has a job for it, or, embedded, its evaluation
    started here) → succeeded | failed."""

    SUBMITTED = "submitted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class SetRecord:
    """One sample set the watcher started: its step, its idempotency key, its job and how it ended."""

    step: int
    key: str
    state: SetState
    job_id: str | None = None
    error: str | None = None


@dataclass
class WatchState:
    """Everything a watcher of one run remembers, as stored in its state file."""

    path: Path
    run: str
    sets: dict[str, SetRecord] = field(default_factory=dict)
    seen: dict[str, list[int]] = field(default_factory=dict)
    """Each set not started yet, with its signature at the last poll: unchanged since then, it is complete."""
    seen_at: float | None = None
    """When that poll was (Unix time): a restarted watcher trusts `seen` only once a poll interval has passed."""
    exported: dict[str, list[str]] = field(default_factory=dict)
    """Per export target, the jobs whose results it holds: a target lacking one is written again."""

    @classmethod
    def load(cls, path: Path, run: str) -> WatchState:
        if not path.exists():
            return cls(path, run)
        try:
            data = json.loads(path.read_text())
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
            sets = {name: SetRecord(**{**rec, "state": SetState(rec["state"])}) for name, rec in data["sets"].items()}
            seen = {name: list(sig) for name, sig in data.get("seen", {}).items()}
            seen_at = data.get("seen_at")
            exported = {target: list(jobs) for target, jobs in data.get("exported", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EvalfarmError(f"the watch state {path} is unreadable ({exc}); move it away to start over "
                                "(sets already submitted through the farm's API are not submitted twice: "
                                "their idempotency keys return the same jobs)") from exc
        if data.get("run") != run:
            raise EvalfarmError(f"the watch state {path} belongs to run {data.get('run')!r}, not {run!r}; "
                                "pass --state to keep each run's state apart")
        return cls(path, run, sets, seen, seen_at, exported)

    def save(self) -> None:
        data: dict[str, Any] = {"version": STATE_VERSION, "run": self.run,
                                "sets": {n: asdict(r) for n, r in self.sets.items()}, "seen": self.seen,
                                "seen_at": self.seen_at, "exported": self.exported}
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode())


class StateLock:
    """An exclusive, non-blocking lock beside the state file, held for the watcher's life."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path.with_name(state_path.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise EvalfarmError(f"cannot write the watch state beside {self.path} ({exc.strerror}); pass --state "
                                "with a path in a writable directory") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise EvalfarmError(f"another watcher holds {self.path}: one watcher per run and state file") from None
        except OSError as exc:  # a filesystem without locks (some NFS, FUSE mounts)
            os.close(self._fd)
            raise EvalfarmError(f"cannot lock {self.path} ({exc.strerror}); pass --state with a path on a local "
                                "filesystem") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
