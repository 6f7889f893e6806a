"""A job as the lifecycle reads it: one typed snapshot of its row, with config and plan decoded once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from evalfarm.config import EvalConfig
from evalfarm.db import Job, JobState
from evalfarm.keys import INCEPTION, JOB_REFERENCE
from evalfarm.scheduler.plan import REFERENCE, JobPlan

EMBEDDED, FARM = "embedded", "farm"  #: job modes: run by `evalfarm eval` in one process, or by the farm


@dataclass(frozen=True)
class JobSnapshot:
    id: str
    state: JobState
    kind: str
    mode: str
    samples_uri: str
    reference_uri: str | None
    config: EvalConfig
    plan: JobPlan
    weights_sha256: str | None
    samples_hash: str | None
    reference_hash: str | None
    n_samples: int | None
    n_reference: int | None
    run: str | None
    step: int | None
    tags: dict[str, Any]
    error: str | None
    result: dict[str, Any] | None
    created_at: datetime | None
    finished_at: datetime | None
    submitted_by: str | None = None
    callback_url: str | None = None

    @classmethod
    def of(cls, job: Job) -> JobSnapshot:
        return cls(
            id=job.id, state=JobState(job.state), kind=job.kind, mode=job.mode, samples_uri=job.samples_uri,
            reference_uri=job.reference_uri, config=EvalConfig.from_dict(job.config), plan=JobPlan.from_dict(job.plan),
            weights_sha256=job.weights_sha256, samples_hash=job.samples_hash, reference_hash=job.reference_hash,
            n_samples=job.n_samples, n_reference=job.n_reference, run=job.run, step=job.step, tags=job.tags or {},
            error=job.error, result=job.result, created_at=job.created_at, finished_at=job.finished_at,
            submitted_by=job.submitted_by, callback_url=job.callback_url,
        )

    @property
    def is_reference_job(self) -> bool:
        return self.kind == JOB_REFERENCE

    @property
    def extractor_weights(self) -> dict[str, str]:
        """The SHA-256 of each extractor's weights, as pinned at planning (jobs planned before there were other
        extractors were pinned to Inception's alone)."""
        if self.plan.weights:
            return dict(self.plan.weights)
        return {INCEPTION: self.weights_sha256} if self.weights_sha256 else {}

    def keeps_features(self, side: str, extractor: str | None = None) -> bool:
        """Whether shards of `side` must keep their feature rows (of `extractor`, or of any): for KID or PRC on
        it, or a reference to cache."""
        if self.is_reference_job or (side == REFERENCE and self.config.cache):
            return True
        metrics = self.config.metrics if extractor is None else self.config.metrics_on(extractor)
        return "kid" in metrics or "prc" in metrics
