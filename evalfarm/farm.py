"""The farm spoken to directly, with its database and broker credentials: what the API serves, and what the
CLI uses when no `EVALFARM_API_URL` is set.

    >>> from evalfarm.farm import Farm
    >>> farm = Farm()  # EVALFARM_DATABASE_URL, EVALFARM_REDIS_URL
    >>> job = farm.submit("samples.npz", ref="cifar10-train", run="my-run", step=120000)
    >>> farm.wait(job)["frechet_inception_distance"]

It has the methods of the light HTTP client (`evalfarm.client.Client`), which is what training jobs should
use: that one needs no database credentials and loads no torch. Submitting needs no weights file either:
the farm pins each job to the weights its workers hold (pass `weights_sha256` to require particular ones).
"""

from __future__ import annotations

import functools
import getpass
import logging
from typing import Any

from evalfarm.client import wait_for_end
from evalfarm.config import EvalConfig
from evalfarm.db import JobState
from evalfarm.errors import Conflict, InvalidField, JobError, JobNotFound
from evalfarm.keys import JOB_EVAL
from evalfarm.scheduler import ends, queries, records, webhooks
from evalfarm.scheduler.context import farm_context
from evalfarm.scheduler.job import FARM
from evalfarm.scheduler.tokens import LOCAL_SUBMITTER
from evalfarm.settings import Settings, get_settings
from evalfarm.workers.app import DELIVER_TASK, PLAN_TASK, make_app
from evalfarm.workers.outages import is_outage
from evalfarm.workers.registry import held_weights

log = logging.getLogger(__name__)


def local_submitter() -> str:
    """Who a submit straight to the database is: not a token (their names have no ':'), but the OS user."""
    try:
        return f"{LOCAL_SUBMITTER}{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name in a bare container
        return f"{LOCAL_SUBMITTER}unknown"


class Farm:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if not self.settings.database_url:
            raise JobError("the farm needs EVALFARM_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1:5432/evalfarm), "
                           "or EVALFARM_API_URL to go through its HTTP API")
        self.ctx = farm_context(self.settings)

    @functools.cached_property
    def _celery(self) -> Any:
        return make_app(self.settings)  # this farm's broker, not whatever the environment names

    def _send(self, task: str, *args: str) -> bool:
        """Send a step by name (the submitting side loads no task code); False when the broker is down. The row
        is committed already, so the caller is not told to retry what it did: the reconciler sends it."""
        try:
            self._celery.send_task(task, args=list(args))
            return True
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("%s %s not sent now (%s); the reconciler will send it", task, args, type(exc).__name__)
            return False

    def create(
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
        callback_url: str | None = None,
        submitted_by: str | None = None,
        idempotency_key: str | None = None,
        **config_fields: Any,
    ) -> records.Submitted:
        """Record the job, then enqueue its planning (after the commit, so the task always finds its row).
        A repeat under the same idempotency key returns the earlier job before anything is checked again.
        `config_fields` are `EvalConfig` fields, applied over `config`."""
        config = (config or EvalConfig()).with_(**config_fields)
        request = records.Submission(samples, ref, config, kind=kind, run=run, step=step,
                                     tags=tags or {}, weights_sha256=weights_sha256, reference_name=reference_name,
                                     callback_url=callback_url)
        who = submitted_by or local_submitter()
        if idempotency_key is not None:
            earlier = records.earlier_job(self.ctx.sessions, request, who, idempotency_key)
            if earlier is not None:
                return earlier
        if callback_url:
            webhooks.check_callback_url(callback_url, self.settings.callback_hosts)
            if not self.settings.webhook_secret:
                raise InvalidField("callback_url", "this farm cannot sign webhooks: EVALFARM_WEBHOOK_SECRET is not set")
        if weights_sha256:
            self.check_weights(weights_sha256)
        submitted = records.create_job(self.ctx.sessions, request, mode=FARM, submitted_by=who,
                                       idempotency_key=idempotency_key)
        if submitted.created and not self._send(PLAN_TASK, submitted.job_id):
            records.mark_unsent(self.ctx.sessions, submitted.job_id)  # the reconciler's next pass sends it
        return submitted

    def submit(self, samples: str, ref: str | None = None, config: EvalConfig | None = None, **options: Any) -> str:
        """`create`, returning the job id, as `Client.submit` does."""
        return self.create(samples, ref, config, **options).job_id

    def check_weights(self, weights_sha256: str) -> None:
        """Conflict when workers announced themselves and none holds these weights. With no worker seen, the
        job waits, and planning refuses it should the first worker hold others."""
        held = held_weights(self.ctx.partials.redis)
        if held and weights_sha256 not in held:
            listed = ", ".join(sorted(h[:12] + "…" for h in held))
            raise Conflict(f"no worker of this farm holds Inception weights with sha256 {weights_sha256[:12]}…; "
                           f"its workers hold {listed}")

    def state(self, job_id: str) -> str:
        state = records.job_state(self.ctx.sessions, job_id)
        if state is None:
            raise JobNotFound(f"no job {job_id}")
        return state.value

    def status(self, job_id: str) -> dict[str, Any]:
        return queries.job_status(self.ctx.sessions, job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """The result document once the job succeeds; JobError if it failed or was cancelled. Waits through a
        database restart."""
        from sqlalchemy.exc import OperationalError

        def look() -> tuple[JobState, Any, str | None]:
            job = records.get_job(self.ctx.sessions, job_id)
            return job.state, job.result, job.error

        return wait_for_end(job_id, look, (OperationalError,), timeout=timeout, poll_s=poll_s)

    def cancel(self, job_id: str) -> bool:
        """Cooperative: queued shards are skipped, running ones stop at their next batch. False when the job
        had ended already."""
        records.get_job(self.ctx.sessions, job_id)  # JobNotFound for an unknown id
        cancelled = ends.cancel_job(self.ctx, job_id)
        for delivery_id in webhooks.due(self.ctx.sessions, job_id):
            self._send(DELIVER_TASK, delivery_id)
        return cancelled

    def owner(self, job_id: str) -> str | None:
        """Who submitted the job (a token name, or `local:USER`)."""
        return records.get_job(self.ctx.sessions, job_id).submitted_by

    def jobs(self, *, run: str | None = None, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return queries.list_jobs(self.ctx.sessions, run=run, state=JobState(state) if state else None, limit=limit)

    def results(self, *, run: str | None = None, metric: str | None = None, limit: int = 50,
                offset: int = 0) -> list[dict[str, Any]]:
        """Succeeded evaluations, as `evalfarm results` lists them; `offset` pages through a long history."""
        return queries.query_results(self.ctx.sessions, run=run, metric=metric, limit=limit, offset=offset)

    def references(self) -> list[dict[str, Any]]:
        return queries.list_references(self.ctx.sessions)

    def is_named_reference(self, name: str) -> bool:
        return records.named_reference(self.ctx.sessions, name) is not None
