"""What one worker process keeps for its life: its context, its weights, its network, its GPU.

Created lazily, in the pool child, never before the prefork pool forks: a CUDA context or a database
connection opened in the parent would be shared by every child.
"""

from __future__ import annotations

import os
import socket

from celery import signals

from evalfarm.models import FeatureExtractor, Weights, load_weights
from evalfarm.scheduler.context import Context, farm_context
from evalfarm.settings import get_settings

_ctx: Context | None = None
_ctx_pid: int | None = None
_weights: Weights | None = None
_extractor: FeatureExtractor | None = None
_device: str | None = None


def context() -> Context:
    """This process's database engine, Redis client and stores; a forked child never uses its parent's."""
    global _ctx, _ctx_pid
    if _ctx is None or _ctx_pid != os.getpid():
        _ctx, _ctx_pid = farm_context(get_settings()), os.getpid()
    return _ctx


def weights() -> Weights:
    """The weights this farm is configured with (hashed once per process); jobs are pinned to them."""
    global _weights
    if _weights is None:
        _weights = load_weights(get_settings())
    return _weights


def extractor(precision: str) -> FeatureExtractor:
    """The network, loaded once per worker process on its own GPU, kept for the process's life."""
    global _extractor
    if _extractor is None or _extractor.precision != precision:
        _extractor = FeatureExtractor(weights(), _device or get_settings().device, precision)
    return _extractor


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
