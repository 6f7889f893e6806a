"""What one worker process keeps for its life: its context, its weights, its network, its GPU.

Created lazily, in the pool child, never before the prefork pool forks: a CUDA context or a database
connection opened in the parent would be shared by every child.
"""

from __future__ import annotations

import functools
import os
import socket

from celery import signals

from evalfarm.config import EvalConfig
from evalfarm.keys import INCEPTION
from evalfarm.models import Weights
from evalfarm.models.featurizers import Featurizer, build_featurizer, load_weights_for
from evalfarm.scheduler import records
from evalfarm.scheduler.context import Context, farm_context
from evalfarm.settings import get_settings

_ctx: Context | None = None
_ctx_pid: int | None = None
_weights: dict[str, Weights] = {}
_featurizers: dict[str, Featurizer] = {}  #: least recently used first
MAX_HELD = 3  #: networks kept loaded per worker process
_device: str | None = None


def context() -> Context:
    """This process's database engine, Redis client and stores; a forked child never uses its parent's."""
    global _ctx, _ctx_pid
    if _ctx is None or _ctx_pid != os.getpid():
        _ctx, _ctx_pid = farm_context(get_settings()), os.getpid()
    return _ctx


def weights(name: str = INCEPTION) -> Weights:
    """The weights this farm is configured with for an extractor (found, or downloaded, and hashed once per
    process, when a job first needs them); jobs are pinned to them."""
    if name not in _weights:
        _weights[name] = load_weights_for(get_settings(), name)
    return _weights[name]


def featurizers(names: tuple[str, ...], precision: str) -> list[Featurizer]:
    """The job's networks, each loaded once per worker process on its own GPU. The most recently used
    MAX_HELD are kept, so that shards of jobs on different extractors take turns without reloading, and a GPU
    does not fill up with every extractor ever used."""
    out = []
    for name in names:
        held = _featurizers.pop(name, None)
        if held is None or getattr(held, "precision", "fp32") != precision:
            held = build_featurizer(name, weights(name), _device or get_settings().device, precision)
        _featurizers[name] = held  # now the most recently used
        out.append(held)
    while len(_featurizers) > max(MAX_HELD, len(names)):
        del _featurizers[next(iter(_featurizers))]
    return out


@functools.lru_cache(maxsize=64)
def job_config(job_id: str) -> EvalConfig:
    """A job's configuration, read once per process: it never changes after submission, and a shard's task
    needs it before its claim (which networks to hold) - one transaction per shard less."""
    return records.get_job(context().sessions, job_id).config


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@signals.worker_process_init.connect
def _pick_device(**_: object) -> None:
    """One process per GPU: child k of the pool uses GPU k (CUDA is first touched here, after the fork)."""
    global _device
    import multiprocessing

    from billiard.process import current_process

    # Pool children are daemonic, and daemonic processes may not start the DataLoader's decode processes.
    # Those watch their parent and exit with it, so lifting the flag leaks nothing.
    for proc in (current_process(), multiprocessing.current_process()):
        proc._config["daemon"] = False  # noqa: SLF001
    wanted = get_settings().device
    index = getattr(current_process(), "index", 0) or 0
    if wanted in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            _device = f"cuda:{index % torch.cuda.device_count()}"
