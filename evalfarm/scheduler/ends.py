"""How a job ends from outside its steps: failed by a task's policy, cancelled by its submitter, and swept
by the janitor once it has ended. Light on purpose (no network, no torch): the API cancels jobs too."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from evalfarm.scheduler import deadlines, records
from evalfarm.scheduler.context import Context
from evalfarm.scheduler.plan import INDEXES

DEFAULT_INDEX_RETENTION_S = 7 * 24 * 3600.0  #: a 1M-member tar's listing is ~45 MB; a week unplanned and it goes


def fail_job(ctx: Context, job_id: str, error: str) -> None:
    """The final failure of a step: the job fails with `error`, and its partials are removed."""
    records.fail_job(ctx.sessions, job_id, error)
    ctx.partials.drop(job_id)


def sweep(ctx: Context, *, retention_s: float, index_retention_s: float = DEFAULT_INDEX_RETENTION_S) -> set[str]:
    """The janitor: remove partials and store files of jobs that ended over `retention_s` ago (ending a job
    already removes its own; this catches what a crash or a race left behind), and sample-set listings not
    planned for `index_retention_s` (`plan.keep_index` rewrites one on every plan, so those in use stay)."""
    now = datetime.now(timezone.utc)
    swept = deadlines.ended_before(ctx.sessions, ctx.partials.job_ids(), now - timedelta(seconds=retention_s))
    for job_id in swept:
        ctx.partials.drop(job_id)
    for key in ctx.store.modified_before(INDEXES, now.timestamp() - index_retention_s):
        ctx.store.delete(key)  # a worker that still wanted it lists the set itself: time, not the job
    return swept


def cancel_job(ctx: Context, job_id: str) -> bool:
    """Cooperative: queued shards are skipped when they start, running ones stop at their next batch."""
    changed = records.cancel_job(ctx.sessions, job_id)
    ctx.partials.drop(job_id)
    return changed

