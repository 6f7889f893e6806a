"""Python client of the farm: submit from training infra, then poll, wait, cancel, query.

    >>> from evalfarm.client import Client
    >>> c = Client()  # EVALFARM_DATABASE_URL, EVALFARM_REDIS_URL
    >>> job = c.submit("samples.npz", ref="cifar10-train", run="my-run", step=120000)
    >>> c.wait(job)["frechet_inception_distance"]
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from evalfarm.config import EvalConfig
from evalfarm.db import Job, Shard
from evalfarm.errors import JobError
from evalfarm.scheduler.jobs import cancel_job, create_job
from evalfarm.scheduler.local import load_weights
from evalfarm.settings import Settings, get_settings


class Client:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if not self.settings.database_url:
            raise JobError("the farm needs EVALFARM_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1:5432/evalfarm)")
        from evalfarm.workers.tasks import context

        self.ctx = context()

    def submit(
        self,
        samples: str,
        ref: str | None = None,
        config: EvalConfig | None = None,
        *,
        run: str | None = None,
        step: int | None = None,
        tags: dict[str, Any] | None = None,
        weights: str | None = None,
        kind: str = "eval",
        reference_name: str | None = None,
    ) -> str:
        """Record the job, then enqueue its planning (after the commit, so the task always finds its row)."""
        from evalfarm.workers.tasks import plan_job_task

        w = load_weights(self.settings, weights)
        job_id = create_job(
            self.ctx,
            samples=samples,
            ref=ref,
            config=config or EvalConfig(),
            weights_sha256=w.sha256,
            mode="farm",
            kind=kind,
            run=run,
            step=step,
            tags=tags,
            reference_name=reference_name,
        )
        plan_job_task.delay(job_id)
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        with self.ctx.sessions() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobError(f"no job {job_id}")
            shards = list(s.scalars(select(Shard).where(Shard.job_id == job_id)))
        done = [sh for sh in shards if sh.state == "done"]
        images_total = sum(sh.stop - sh.start for sh in shards)
        images_done = sum(sh.stop - sh.start for sh in done)
        busy = sum(sh.seconds or 0.0 for sh in done)
        rate = images_done / busy if busy else None
        running = max(1, sum(sh.state == "running" for sh in shards))
        eta = (images_total - images_done) / rate / running if rate else None
        return {
            "job_id": job.id,
            "state": job.state,
            "kind": job.kind,
            "shards_done": len(done),
            "shards_total": len(shards),
            "images_done": images_done,
            "images_total": images_total,
            "images_per_second_per_worker": rate,
            "eta_seconds": eta if job.state == "running" else None,
            "error": job.error,
            "failures": [
                {"side": sh.side, "shard": sh.index, "attempts": sh.attempts, "error": sh.error}
                for sh in shards
                if sh.error
            ],
            "shards": [
                {"side": sh.side, "index": sh.index, "state": sh.state, "attempts": sh.attempts, "worker": sh.worker}
                for sh in shards
            ],
            "result": job.result,
        }

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """The result document once the job succeeds; JobError if it failed or was cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.ctx.sessions() as s:
                job = s.get(Job, job_id)
                if job is None:
                    raise JobError(f"no job {job_id}")
                state, result, error = job.state, job.result, job.error
            if state == "succeeded":
                return result
            if state in ("failed", "cancelled"):
                raise JobError(f"job {job_id} {state}: {error}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> bool:
        """Cooperative: queued shards are skipped, running ones stop at their next batch."""
        return cancel_job(self.ctx, job_id)
