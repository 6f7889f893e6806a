"""The history of a training run: its succeeded evaluations by step, read from wherever results live.

One reader for the commands that look back at runs (`export`, `plot`, `watch`'s exports): the farm's API
when `EVALFARM_API_URL` is set, else the results database (`EVALFARM_DATABASE_URL`, or this machine's
SQLite file). It loads neither torch nor Celery.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from evalfarm.errors import EvalfarmError
from evalfarm.keys import METRIC_FAMILIES, is_canonical_inception, qualified_key
from evalfarm.settings import Settings, get_settings

PAGE = 1000  #: results read per request (the API's bound on one page)


class ResultsSource(Protocol):
    """Anything with the `results` method of `evalfarm.client.Client` and `evalfarm.farm.Farm`."""

    def results(self, *, run: str | None = None, metric: str | None = None, limit: int = 50,
                offset: int = 0) -> list[dict[str, Any]]:
        ...


@dataclass(frozen=True)
class Point:
    """One succeeded evaluation of a run: its step, and every metric value it stored."""

    run: str
    step: int | None
    job_id: str
    finished_at: datetime | None
    metrics: dict[str, float] = field(default_factory=dict)
    weights_sha256: str | None = None
    weights_canonical: bool | None = None
    """As the result recorded it: False when some extractor's weights are not its published file."""

    @property
    def canonical_weights(self) -> bool:
        """Whether the result came from published weights (else: not a publishable number). Results recorded
        before they said so are judged by their Inception weights."""
        if self.weights_canonical is not None:
            return self.weights_canonical
        return is_canonical_inception(self.weights_sha256)

    def value(self, family: str, extractor: str | None = None) -> tuple[float, float | None] | None:
        """(value, std) of a metric family (`is`, `fid`, `kid`) on an extractor (default: the family's own,
        Inception), or None when this result lacks it."""
        key, std_key = METRIC_FAMILIES[family]
        if extractor is not None:
            key, std_key = qualified_key(key, extractor), std_key and qualified_key(std_key, extractor)
        if key not in self.metrics:
            return None
        return self.metrics[key], (self.metrics.get(std_key) if std_key else None)


class DatabaseResults:
    """The results database read directly (no API): the farm's Postgres or this machine's SQLite."""

    def __init__(self, settings: Settings | None = None) -> None:
        from evalfarm.db import session_factory

        self.sessions = session_factory((settings or get_settings()).db_url)

    def results(self, *, run: str | None = None, metric: str | None = None, limit: int = 50,
                offset: int = 0) -> list[dict[str, Any]]:
        from evalfarm.scheduler.queries import query_results

        return query_results(self.sessions, run=run, metric=metric, limit=limit, offset=offset)


def results_source(settings: Settings | None = None) -> ResultsSource:
    """The farm's API when `EVALFARM_API_URL` is set, else the results database."""
    settings = settings or get_settings()
    if settings.api_url:
        from evalfarm.client import Client

        return Client()
    return DatabaseResults(settings)


def run_history(run: str, source: ResultsSource | None = None) -> list[Point]:
    """The run's succeeded evaluations, all of them, sorted by step (results without a step last, by finish
    time)."""
    rows = all_results(source or results_source(), run)
    points = [
        Point(run=r["run"], step=r["step"], job_id=r["job_id"], finished_at=_time(r.get("finished_at")),
              metrics={k: float(v) for k, v in r["metrics"].items()}, weights_sha256=r.get("weights_sha256"),
              weights_canonical=r.get("weights_canonical"))
        for r in rows
    ]
    return sorted(points, key=lambda p: (p.step is None, p.step or 0, p.finished_at or _EPOCH))


def all_results(source: ResultsSource, run: str, metric: str | None = None) -> list[dict[str, Any]]:
    """Every succeeded result of `run`, by step, page after page (`ResultsSource.results` rows)."""
    if not run:
        raise EvalfarmError("a run name is needed (an empty name would read every run's results as one)")
    rows: list[dict[str, Any]] = []
    while True:
        page = source.results(run=run, metric=metric, limit=PAGE, offset=len(rows))
        if page and page[0]["job_id"] in {r["job_id"] for r in rows}:  # a server that ignores `offset`
            raise EvalfarmError(f"run {run!r} has more than {PAGE} results and the farm's API does not page "
                                "through them: upgrade its server")
        rows += page
        if len(page) < PAGE:
            return rows


def series(points: Sequence[Point], family: str, extractor: str | None = None) -> list[tuple[int, float, float | None]]:
    """(step, value, std) of one metric family, by step: what a plot of the run draws. Results without a
    step, without this metric or with a non-finite value are left out."""
    out = []
    for p in points:
        v = p.value(family, extractor)
        if p.step is not None and v is not None and math.isfinite(v[0]):
            out.append((p.step, v[0], v[1]))
    return sorted(out, key=lambda t: t[0])


def require_history(run: str, source: ResultsSource | None = None) -> list[Point]:
    """`run_history`, with a clear error when the run has no result at all (a typo, or nothing finished)."""
    points = run_history(run, source)
    if not points:
        raise EvalfarmError(f"run {run!r} has no succeeded evaluation (`evalfarm results` lists the runs' results)")
    return points


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _time(value: Any) -> datetime | None:
    """A finish time as an aware UTC time, whether it came from Postgres, SQLite (naive) or JSON (text)."""
    if value is None:
        return None
    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)
