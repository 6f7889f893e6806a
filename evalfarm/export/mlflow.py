"""MLflow: each result logged at its step, with its finish time, into the MLflow run named like evalfarm's.

MLflow keeps every logged value and plots by step, so late results need no rewrite; re-exporting reads each
metric's history first and logs only the (step, value) pairs it lacks. A client bound to the tracking URI is
used throughout, never MLflow's global state, so a training process's own active run is left alone.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from evalfarm.errors import EvalfarmError
from evalfarm.export import metric_name, missing, wall_time

if TYPE_CHECKING:
    from evalfarm.export import Target
    from evalfarm.runs import Point

#: fail within about a minute on a tracking server that does not answer (MLflow's defaults: 7 retries, 120 s)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
DEFAULT_EXPERIMENT = "evalfarm"  #: where results go when the target names no experiment
RUN_TAG = "evalfarm.run"  #: set on the MLflow run, naming the evalfarm run exported into it
BATCH = 1000  #: MLflow refuses more metrics than this in one log_batch call


def export(run: str, points: Sequence[Point], target: Target) -> int:
    """Log the results of `points` the MLflow run lacks; return how many results had anything new."""
    try:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise missing("mlflow", "mlflow") from exc

    experiment = target.name or DEFAULT_EXPERIMENT
    # MLflow retries an unreachable server for minutes by default; a watcher has sets to evaluate meanwhile.
    # The user's own settings of these variables win.
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        client = MlflowClient(tracking_uri=target.location)
        experiment_id = _experiment_id(client, experiment)
        run_id, created = _run_id(client, experiment_id, run)
        keys = sorted({k for p in points for k in p.metrics})
        logged = {k: {(m.step, _comparable(m.value)) for m in client.get_metric_history(run_id, metric_name(k))}
                  for k in keys}
        metrics, written = [], 0
        for p in points:
            fresh = [(k, v) for k, v in sorted(p.metrics.items()) if (p.step, _comparable(v)) not in logged[k]]
            for k, v in fresh:
                logged[k].add((p.step, _comparable(v)))
                metrics.append(Metric(metric_name(k), v, round(wall_time(p) * 1000), p.step))
            written += bool(fresh)
        for start in range(0, len(metrics), BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + BATCH])
        if created:
            client.set_terminated(run_id)
    except MlflowException as exc:
        first_line = next((line.strip() for line in str(exc.message).splitlines() if line.strip()), repr(exc))
        raise EvalfarmError(f"MLflow at {target.location}: {first_line}") from exc
    return written


def _experiment_id(client: Any, name: str) -> str:
    """The experiment called `name`, created when there is none."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another export created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise EvalfarmError(f"MLflow experiment {name!r} is deleted: restore it, or name another after '#'")
    return experiment.experiment_id


def _run_id(client: Any, experiment_id: str, run: str) -> tuple[str, bool]:
    """The MLflow run named `run` (one evalfarm exported into before, else the newest), or a new one; and
    whether it was created now."""
    found = [r for r in _runs_named(client, experiment_id, run) if r.info.run_name == run]
    if found:
        ours = [r for r in found if r.data.tags.get(RUN_TAG) == run]
        chosen = (ours or found)[0]
        if RUN_TAG not in chosen.data.tags:
            client.set_tag(chosen.info.run_id, RUN_TAG, run)
        return chosen.info.run_id, False
    return client.create_run(experiment_id, run_name=run, tags={RUN_TAG: run}).info.run_id, True


def _runs_named(client: Any, experiment_id: str, run: str) -> list[Any]:
    """Active runs whose name is `run`, newest first. A name holding both quote characters cannot be written
    in a filter, so then every run of the experiment is read and filtered here."""
    quote = next((q for q in ("'", '"') if q not in run), None)
    where = f"tags.`mlflow.runName` = {quote}{run}{quote}" if quote else ""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=where, order_by=["attributes.start_time DESC"],
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _comparable(value: float) -> Any:
    """A value as MLflow gives it back: NaN equal to NaN, infinities as the largest finite floats it stores."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return math.copysign(sys.float_info.max, value)
    return value
