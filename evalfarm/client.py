"""Python client of the farm: submit from training infra, then poll, wait, cancel, query.

    >>> from evalfarm.client import Client
    >>> c = Client()  # EVALFARM_DATABASE_URL, EVALFARM_REDIS_URL
    >>> job = c.submit("samples.npz", ref="cifar10-train", run="my-run", step=120000)
    >>> c.wait(job)["frechet_inception_distance"]

Importing it loads none of torch, Celery, SQLAlchemy or Redis, and submitting needs no weights file: the
farm pins each job to the weights its workers hold (pass `weights_sha256` to require particular ones).
"""

from __future__ import annotations

import time
from typing import Any

from evalfarm.config import EvalConfig
from evalfarm.errors import JobError
from evalfarm.keys import JOB_EVAL
from evalfarm.settings import Settings, get_settings


class Client:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if not self.settings.database_url:
            raise JobError("the farm needs EVALFARM_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1:5432/evalfarm)")
        from evalfarm.scheduler.context import farm_context

        self.ctx = farm_context(self.settings)

    def submit(
        self,
        samples: str,
        ref: str | None = None,
        config: EvalConfig | None = None,
        *,
        run: str | None = None,
        step: int | None = None,
        tags: dict[str, Any] | None = None,
        weights_sha256: str | None = None,
        kind: str = JOB_EVAL,
        reference_name: str | None = None,
    ) -> str:
        """Record the job, then enqueue its planning (after the commit, so the task always finds its row)."""
        from evalfarm.scheduler import records
        from evalfarm.scheduler.job import FARM
        from evalfarm.workers.app import PLAN_TASK, app

        job_id = records.create_job(
            self.ctx.sessions, samples=samples, ref=ref, config=config or EvalConfig(), weights_sha256=weights_sha256,
            mode=FARM, kind=kind, run=run, step=step, tags=tags, reference_name=reference_name,
        )
        app.send_task(PLAN_TASK, args=[job_id])  # by name: the submitting side loads no task code
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        from evalfarm.scheduler.queries import job_status

        return job_status(self.ctx.sessions, job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """The result document once the job succeeds; JobError if it failed or was cancelled."""
        from sqlalchemy.exc import OperationalError

        from evalfarm.db import JobState
        from evalfarm.scheduler.records import get_job

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                job = get_job(self.ctx.sessions, job_id)
            except OperationalError:  # the database is restarting: the job goes on, and so does the wait
                if deadline is not None and time.monotonic() > deadline:
                    raise
                time.sleep(poll_s)
                continue
            if job.state == JobState.SUCCEEDED:
                return job.result
            if job.state.final:
                raise JobError(f"job {job_id} {job.state}: {job.error}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> bool:
        """Cooperative: queued shards are skipped, running ones stop at their next batch."""
        from evalfarm.scheduler.steps import cancel_job

        return cancel_job(self.ctx, job_id)

    def results(self, *, run: str | None = None, metric: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Succeeded evaluations, as `evalfarm results` lists them."""
        from evalfarm.scheduler.queries import query_results

        return query_results(self.ctx.sessions, run=run, metric=metric, limit=limit)
