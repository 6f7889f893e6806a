"""The embedded runner behind `evalfarm eval`: the farm's plan → shards → reduce, in this process.

No Redis, no Postgres: SQLite records the job and partials stay in memory. Because it calls the same
`plan_job`, `run_shard` and `reduce_job` as the Celery tasks, a result here equals the farm's.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from evalfarm.config import EvalConfig
from evalfarm.db import session_factory
from evalfarm.errors import EvalfarmError, JobError
from evalfarm.models import FeatureExtractor, Weights, resolve_weights
from evalfarm.scheduler.jobs import Context, create_job, fail_job, load_job, plan_job, reduce_job, run_shard
from evalfarm.scheduler.partials import MemoryPartials
from evalfarm.settings import Settings, get_settings
from evalfarm.store import FeatureStore


def local_context(settings: Settings) -> Context:
    return Context(session_factory(settings.db_url), FeatureStore(settings.store), MemoryPartials())


def load_weights(settings: Settings, weights: str | None = None) -> Weights:
    return resolve_weights(
        weights or settings.weights, settings.weights_cache, allow_download=settings.allow_download
    )


def run_local(
    samples: str,
    ref: str | None,
    config: EvalConfig,
    *,
    settings: Settings | None = None,
    weights: str | None = None,
    device: str | None = None,
    kind: str = "eval",
    reference_name: str | None = None,
    run: str | None = None,
    step: int | None = None,
    tags: dict[str, Any] | None = None,
    progress: bool = False,
    num_workers: int | None = None,
) -> dict[str, Any]:
    settings = settings or get_settings()
    w = load_weights(settings, weights)
    ctx = local_context(settings)
    job_id = create_job(
        ctx,
        samples=samples,
        ref=ref,
        config=config,
        weights_sha256=w.sha256,
        mode="embedded",
        kind=kind,
        run=run,
        step=step,
        tags=tags,
        reference_name=reference_name,
    )
    try:
        todo = plan_job(ctx, job_id)
        job = load_job(ctx, job_id)
        shards = {(sh.side, sh.index): sh.stop - sh.start for sh in job.shards}
        extractor = FeatureExtractor(w, device or settings.device, config.precision) if todo else None
        with tqdm(total=sum(shards.values()), unit="img", desc="featurizing", disable=not progress) as bar:
            for side, index in todo:
                run_shard(
                    ctx, job_id, side, index, extractor,
                    num_workers=num_workers if num_workers is not None else settings.loader_workers,
                    on_batch=bar.update,
                )
        result = reduce_job(ctx, job_id)
        if not isinstance(result, dict):
            raise JobError(f"job {job_id} did not finish: {load_job(ctx, job_id).error or 'unknown state'}")
        return result
    except EvalfarmError as exc:
        fail_job(ctx, job_id, str(exc))
        raise
    except BaseException as exc:
        fail_job(ctx, job_id, f"{type(exc).__name__}: {exc}")
        raise
