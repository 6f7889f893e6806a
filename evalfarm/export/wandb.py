"""Weights & Biases: each new result logged once, against a step axis of its own (`evalfarm/step`).

W&B's own step must only grow, and a run resumed by another process may be far past the training steps, so
results are logged against the custom x axis `evalfarm/step`, in step order, with their finish time as the
row's wall time. Online, W&B cannot cheaply be asked what an earlier export logged, so a ledger of the
exported job ids per (project, run id) lives in the evalfarm home and only results missing from it are
logged into the resumed run. Offline, every export is an offline run directory of its own, and `wandb sync`
of several directories with one id keeps the last one synced rather than appending: so an offline export
logs the whole history every time, and the newest directory alone is complete. The user's WANDB_MODE,
WANDB_DIR, WANDB_ENTITY... are honoured as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evalfarm.atomic import atomic_write
from evalfarm.errors import EvalfarmError
from evalfarm.export import WANDB_RUN_ID, metric_name, missing, wall_time
from evalfarm.settings import get_settings

if TYPE_CHECKING:
    from evalfarm.export import Target
    from evalfarm.runs import Point

STEP = metric_name("step")  #: the x axis every exported metric is plotted against
MAX_RUN_ID = 64  #: a derived run id is cut to this length (hash included)


def export(run: str, points: Sequence[Point], target: Target) -> int:
    """Log the results of `points` that the ledger does not list yet; return how many were logged."""
    try:
        import wandb
    except ImportError as exc:
        raise missing("wandb", "wandb") from exc

    run_id = target.name or default_run_id(run)
    ledger = ledger_path(target.location, run_id)
    done = set() if offline() else read_ledger(ledger)
    new = [p for p in points if p.job_id not in done]
    if not new:
        return 0
    # No system metrics, machine or git probes: the export sends the results and nothing else.
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_meta=True,
                              x_disable_machine_info=True, disable_git=True, disable_code=True, save_code=False)
    # The run's name is set only on a run of evalfarm's own id: a RUN_ID given names the user's run, kept as is.
    named = {"name": run} if target.name is None else {}
    try:
        wb = wandb.init(project=target.location, id=run_id, resume="allow", reinit="create_new",
                        settings=settings, **named)
    except wandb.errors.Error as exc:  # not logged in, a bad project or id...
        _stop_service()
        raise EvalfarmError(f"W&B project {target.location}, run {run_id}: {exc}") from exc
    try:
        wb.define_metric(STEP)
        wb.define_metric(metric_name("*"), step_metric=STEP)
        for p in new:  # `_timestamp` is the row's wall time, as W&B's own TensorBoard sync sets it
            wb.log({STEP: p.step, "_timestamp": wall_time(p), **{metric_name(k): v for k, v in p.metrics.items()}})
    finally:
        wb.finish()
        _stop_service()
    write_ledger(ledger, target.location, run_id, done | {p.job_id for p in new})
    return len(new)


def offline() -> bool:
    """Whether W&B runs offline here (WANDB_MODE=offline, or its older name dryrun)."""
    return os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun")


def default_run_id(run: str) -> str:
    """The run name itself where W&B accepts it as an id, else its legal characters and a hash of the name
    (deterministic: every export of a run goes to the same W&B run; distinct names never share one)."""
    if WANDB_RUN_ID.fullmatch(run) and len(run) <= MAX_RUN_ID:
        return run
    digest = hashlib.sha256(run.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run).strip("-")[: MAX_RUN_ID - len(digest) - 1]
    return f"{slug}-{digest}" if slug else digest


def ledger_path(project: str, run_id: str) -> Path:
    """`<home>/exports/wandb-<hash>.json`: the job ids already exported to this project and run id."""
    digest = hashlib.sha256(f"{project}/{run_id}".encode()).hexdigest()[:16]
    return Path(get_settings().home) / "exports" / f"wandb-{digest}.json"


def read_ledger(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text())["job_ids"])
    except FileNotFoundError:
        return set()
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalfarmError(f"the W&B export ledger {path} is unreadable ({exc}); delete it to export "
                            "every result again") from exc


def write_ledger(path: Path, project: str, run_id: str, job_ids: set[str]) -> None:
    """Written whole to a temporary file and renamed over the old one: a crash leaves one or the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"project": project, "run_id": run_id, "job_ids": sorted(job_ids)}, indent=1)
    atomic_write(path, body.encode(), durable=False)


def _stop_service() -> None:
    """Stop W&B's service process unless another run of this process (the caller's own) still uses it."""
    import wandb

    try:
        from wandb.sdk.wandb_setup import singleton

        busy = singleton().most_recent_active_run is not None
    except (ImportError, AttributeError):  # another wandb version: leave the service to its exit hook
        return
    if not busy:
        wandb.teardown()
