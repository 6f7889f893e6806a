"""The embedded runner behind `evalfarm eval`: the farm's plan → shards → reduce, in this process.

No Redis, no Postgres: SQLite records the job, and the shards' partials are the farm's files, in a private
directory under the evalfarm home (`scheduler.spill`; held in memory, a million samples' partials would be
tens of GB). Because it calls the same `plan_job`, `run_shard` and `reduce_job` as the Celery tasks, a
result here equals the farm's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evalfarm.config import EvalConfig
from evalfarm.errors import EvalfarmError, JobError
from evalfarm.keys import INCEPTION, JOB_EVAL
from evalfarm.models.featurizers import Featurizer, build_featurizer, load_weights_for
from evalfarm.models.weights import Weights
from evalfarm.scheduler import records
from evalfarm.scheduler.context import Context, embedded_context
from evalfarm.scheduler.ends import fail_job
from evalfarm.scheduler.job import EMBEDDED
from evalfarm.scheduler.spill import spill_directory
from evalfarm.scheduler.steps import plan_job, reduce_job, run_prc_tile, run_shard
from evalfarm.settings import Settings, get_settings


def run_embedded(
    samples: str,
    ref: str | None,
    config: EvalConfig,
    *,
    settings: Settings | None = None,
    weights: str | None = None,
    extractor_weights: dict[str, str] | None = None,
    device: str | None = None,
    kind: str = JOB_EVAL,
    reference_name: str | None = None,
    run: str | None = None,
    step: int | None = None,
    tags: dict[str, Any] | None = None,
    progress: bool = False,
    num_workers: int | None = None,
    on_job: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate (or, with kind "reference", register) a sample set here; returns the result document.
    `on_job` is told the job's id once its row exists, before any work (a caller that may die meanwhile,
    such as `evalfarm watch`, records it). `weights` is Inception's file, `extractor_weights` the others' by name;
    each defaults to its environment variable, then to the canonical file."""
    settings = settings or get_settings()
    paths = {**(extractor_weights or {}), **({INCEPTION: weights} if weights else {})}
    w = {name: load_weights_for(settings, name, paths.get(name)) for name in config.featurizers}
    with spill_directory(Path(settings.home).expanduser() / "spill") as spill:
        return _run(embedded_context(settings, spill), samples, ref, config, w, settings=settings, device=device,
                    kind=kind, reference_name=reference_name, run=run, step=step, tags=tags, progress=progress,
                    num_workers=num_workers, on_job=on_job)


def _run(ctx: Context, samples: str, ref: str | None, config: EvalConfig, w: dict[str, Weights], *,
         settings: Settings, device: str | None, kind: str, reference_name: str | None, run: str | None,
         step: int | None, tags: dict[str, Any] | None, progress: bool, num_workers: int | None,
         on_job: Callable[[str], None] | None) -> dict[str, Any]:
    request = records.Submission(samples, ref, config, kind=kind, run=run, step=step, tags=tags or {},
                                 weights_sha256=w[INCEPTION].sha256 if INCEPTION in w else None,
                                 reference_name=reference_name)
    job_id = records.create_job(ctx.sessions, request, mode=EMBEDDED).job_id
    if on_job is not None:
        on_job(job_id)
    featurizers: list[Featurizer] = []

    def featurize(shards: tuple[tuple[str, int], ...]) -> None:
        if not shards:
            return
        if not featurizers:
            featurizers.extend(build_featurizer(name, w[name], device or settings.device, config.precision)
                               for name in config.featurizers)
        sizes = {(sh.side, sh.index): sh.stop - sh.start for sh in records.shards_of(ctx.sessions, job_id)}
        with tqdm(total=sum(sizes[s] for s in shards), unit="img", desc="featurizing", disable=not progress) as bar:
            for side, index in shards:
                run_shard(
                    ctx, job_id, side, index, featurizers,
                    num_workers=num_workers if num_workers is not None else settings.loader_workers,
                    on_batch=bar.update, heartbeat_s=settings.heartbeat_s,
                )

    try:
        featurize(plan_job(ctx, job_id, lambda name: w[name].sha256, heartbeat_s=settings.heartbeat_s).shards)
        outcome = reduce_job(ctx, job_id, heartbeat_s=settings.heartbeat_s)
        # A cached reference turned out unusable (its images are featurized instead), or precision/recall's
        # tiles: the farm's tasks, run here one after the other.
        while outcome.recompute or outcome.tiles:
            featurize(outcome.recompute)
            for name in outcome.tiles:
                run_prc_tile(ctx, job_id, name, heartbeat_s=settings.heartbeat_s)
            outcome = reduce_job(ctx, job_id, heartbeat_s=settings.heartbeat_s)
        if outcome.result is None:
            raise JobError(f"job {job_id} did not finish: {records.get_job(ctx.sessions, job_id).error or 'unknown state'}")
        return outcome.result
    except EvalfarmError as exc:
        fail_job(ctx, job_id, str(exc))
        raise
    except BaseException as exc:
        fail_job(ctx, job_id, f"{type(exc).__name__}: {exc}")
        raise

