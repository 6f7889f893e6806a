"""How a job ends from outside its steps: failed by a task's policy, cancelled by its submitter, and swept
by the janitor once it has ended. Light on purpose (no network, no torch): the API cancels jobs too."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from evalfarm.scheduler import deadlines, records
from evalfarm.scheduler.context import Context


def fail_job(ctx: Context, job_id: str, error: str) -> None:
    """The final failure of a step: the job fails with `error`, and its partials are removed."""
    records.fail_job(ctx.sessions, job_id, error)
    ctx.partials.drop(job_id)


def sweep(ctx: Context, *, retention_s: float) -> set[str]:
    """The janitor: remove partials and store files of jobs that ended over `retention_s` ago. Ending a job
    already removes its own; this catches what a crash or a race left behind."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=retention_s)
    swept = deadlines.ended_before(ctx.sessions, ctx.partials.job_ids(), cutoff)
    for job_id in swept:
        ctx.partials.drop(job_id)
    return swept


def cancel_job(ctx: Context, job_id: str) -> bool:
    """Cooperative: queued shards are skipped when they start, running ones stop at their next batch."""
    changed = records.cancel_job(ctx.sessions, job_id)
    ctx.partials.drop(job_id)
    return changed

