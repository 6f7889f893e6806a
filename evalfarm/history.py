"""Queries of the results database: history per run and checkpoint, and the list of references."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from evalfarm.db import Job, Reference, session_factory
from evalfarm.keys import METRIC_ALIASES


def query_results(db_url: str, *, run: str | None = None, metric: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Succeeded jobs, newest first; with a run, ordered by step so a training curve reads top to bottom."""
    with session_factory(db_url)() as s:
        q = select(Job).where(Job.state == "succeeded", Job.kind == "eval")
        if run:
            q = q.where(Job.run == run).order_by(Job.step.asc().nulls_last(), Job.finished_at.asc())
        else:
            q = q.order_by(Job.finished_at.desc())
        jobs = list(s.scalars(q.limit(limit)))
        rows = []
        for j in jobs:
            values = {r.name: r.value for r in j.results}
            if metric:
                key = METRIC_ALIASES.get(metric, metric)
                values = {k: v for k, v in values.items() if k == key or (metric in METRIC_ALIASES and k.startswith(key.rsplit("_", 1)[0]))}
            rows.append(
                {
                    "job_id": j.id,
                    "finished_at": j.finished_at,
                    "run": j.run,
                    "step": j.step,
                    "tags": j.tags,
                    "samples": j.samples_uri,
                    "reference": j.reference_uri,
                    "weights_sha256": j.weights_sha256,
                    "metrics": values,
                }
            )
        return rows


def list_references(db_url: str) -> list[dict[str, Any]]:
    with session_factory(db_url)() as s:
        return [
            {"name": r.name, "n": r.n, "resize": r.resize, "weights_sha256": r.weights_sha256, "uri": r.uri}
            for r in s.scalars(select(Reference).order_by(Reference.name))
        ]
