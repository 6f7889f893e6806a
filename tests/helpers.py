"""What the tests share: the environment every test runs under, the CLI runner, image sets, comparisons.

Fixtures live in conftest.py; plain functions live here, so test modules import them by name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evalfarm.models import POOL3_DIM  # noqa: F401 - shared with the test modules

N_SAMPLES = 40
N_REFERENCE = 30
KID_SUBSET = 20

_SCRIPT = shutil.which("evalfarm", path=str(Path(sys.executable).parent))
EVALFARM = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "evalfarm.cli"]

#: variables a test never inherits: a farm database or a weights file from the developer's shell
UNSET = ("EVALFARM_DATABASE_URL", "EVALFARM_WEIGHTS")


def home_vars(home: Path) -> dict[str, str]:
    """The one place the test environment is written: its own evalfarm home and feature store, the CPU,
    and no downloads (the weights are the seeded test file, passed explicitly)."""
    return {
        "EVALFARM_HOME": str(home),
        "EVALFARM_STORE": str(home / "store"),
        "EVALFARM_ALLOW_DOWNLOAD": "0",
        "EVALFARM_DEVICE": "cpu",
    }


def use_home(mp: pytest.MonkeyPatch, home: Path) -> None:
    """Point this process at `home` (see `home_vars`)."""
    for name, value in home_vars(home).items():
        mp.setenv(name, value)
    for name in UNSET:
        mp.delenv(name, raising=False)


@contextmanager
def in_home(home: Path) -> Iterator[None]:
    """`use_home` for the length of a block, for session- and module-scoped fixtures."""
    with pytest.MonkeyPatch.context() as mp:
        use_home(mp, home)
        yield


def home_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess (a user's shell) with evalfarm's home at `home`."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    return {**env, **home_vars(home), **extra}


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`evalfarm ...` as a user runs it; by default in this test's environment."""
    return subprocess.run(
        [*EVALFARM, *map(str, args)], env=env or dict(os.environ), capture_output=True, text=True, timeout=600
    )


def evaluate_in_home(home: Path, samples: str, ref: str | None, **kwargs: object) -> dict:
    """`evalfarm.evaluate` with evalfarm's home at `home` (for session/module-scoped fixtures)."""
    import evalfarm

    with in_home(home):
        return evalfarm.evaluate(samples, ref, **kwargs)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll_s: float = 0.1) -> None:
    """Poll until `predicate()` is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def rel_err(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected)


def write_images(folder: Path, n: int, size: int, seed: int, brightness: float) -> Path:
    """Smooth colour fields (bicubic upsampled 4x4 noise): varied enough to give non-degenerate statistics."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        coarse = (rng.rand(4, 4, 3) * 255 * brightness).astype(np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
    return folder


def images_as_array(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])


def record_result(run: str, step: int | None, values: dict[str, float], *, finished_at: object = None,
                  weights_sha256: str | None = None, db_url: str | None = None) -> str:
    """A succeeded evaluation of `run` at `step` in the results database (this test's own, by default), written
    by the same record functions a reducer uses; returns its job id. For the tests of what reads results
    back (export, plot, dashboard), which need known values rather than featurized ones."""
    from sqlalchemy import update

    from evalfarm.config import EvalConfig
    from evalfarm.db import Job, JobState, session_factory
    from evalfarm.scheduler import records
    from evalfarm.settings import get_settings

    sessions = session_factory(db_url or get_settings().db_url)
    request = records.Submission(f"/samples/{run}/{step}.npz", "/reference.npz", EvalConfig(), run=run, step=step,
                                 weights_sha256=weights_sha256)
    job_id = records.create_job(sessions, request, mode="embedded").job_id
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(state=JobState.REDUCING))
    records.finish_job(sessions, job_id, values, {"job_id": job_id, "run": run, "step": step, **values})
    if finished_at is not None:  # a history that finished at known times (and out of step order)
        with sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(finished_at=finished_at))
    return job_id
