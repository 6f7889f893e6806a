"""BENCH ONLY: a stand-in for the networks, so that the scale benchmark measures the farm, not a forward pass.

NOT A FEATURE EXTRACTOR. It is a fixed, seeded linear map of a 4x4 average-pooled image, ReLU'd, to the real
output shapes: 2048 features and 1008 logits in place of Inception, 4096 features in place of VGG16. Numbers
computed on it mean nothing as metrics. It lives in bench/ only: bench processes put it in place of the named
networks (`install`) before they start a worker or run a job; the product has no way to select it.

    python bench/standin.py worker -c 1 --queues gpu     # an `evalfarm worker` whose networks are stand-ins

With EVALFARM_BENCH_TIMINGS=DIR, a stand-in worker also writes one JSON line per shard to DIR/<pid>.jsonl: the
wall time of each step of `run_shard` (claim, open, featurize, partial write, hashed as written, finish, ...),
and one line per precision/recall tile (its start and end).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evalfarm.keys import INCEPTION  # noqa: E402
from evalfarm.models.weights import Weights  # noqa: E402

LABEL = "bench stand-in (NOT a network: a seeded linear map; its metric values mean nothing)"
SEED = 1234
POOL = 4
SHAPES = {INCEPTION: (2048, 1008), "vgg16": (4096, 0)}  #: features, logits of the network stood in for
#: With EVALFARM_BENCH_STANDIN_DIM=d, every stand-in gives d features (its logits, still 1008, repeat them):
#: the statistics then cost next to nothing, and a run measures the farm's coordination alone.
NARROW_DIM = os.environ.get("EVALFARM_BENCH_STANDIN_DIM")


class StandIn:
    """Features of a uint8 NCHW batch: relu(avgpool4x4(x / 255) @ W + b), W and b seeded per output width."""

    precision = "fp32"

    def __init__(self, name: str) -> None:
        if name not in SHAPES:
            raise ValueError(f"the bench stand-in replaces {sorted(SHAPES)} only, not {name}")
        self.name = name
        self.dim, self.classes = SHAPES[name]
        if NARROW_DIM:
            self.dim = int(NARROW_DIM)
        self.input_size = 299 if name == INCEPTION else 224
        self.device = torch.device("cpu")
        rng = np.random.default_rng([SEED, self.dim])
        self._w = torch.from_numpy(rng.standard_normal((3 * POOL * POOL, self.dim), np.float32))
        self._b = torch.from_numpy(rng.standard_normal(self.dim, np.float32) * 0.5)
        digest = hashlib.sha256(self._w.numpy().tobytes() + self._b.numpy().tobytes()).hexdigest()
        self.weights = Weights(Path(f"<{LABEL}>"), digest)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = torch.nn.functional.adaptive_avg_pool2d(batch.float() / 255.0, POOL).flatten(1)
        return torch.relu(x @ self._w + self._b).numpy()

    def logits(self, features: np.ndarray) -> np.ndarray:
        """A linear map of the features to 1008 logits (a scaled slice: nearly free, as the rest)."""
        reps = -(-self.classes // features.shape[1])
        return np.tile(features, (1, reps))[:, : self.classes] * 4.0


@functools.cache
def standin(name: str) -> StandIn:
    return StandIn(name)


def install() -> None:
    """Put the stand-in in place of every network this process would load (bench processes only)."""
    from evalfarm.models import featurizers
    from evalfarm.scheduler import embedded
    from evalfarm.workers import runtime

    def weights_for(settings: Any, name: str, path: Any = None) -> Weights:
        return standin(name).weights

    def build(name: str, weights: Weights, device: str = "auto", precision: str = "fp32") -> StandIn:
        return standin(name)

    for module in (featurizers, embedded, runtime):
        module.load_weights_for = weights_for
        module.build_featurizer = build


# ---------------------------------------------------------------------------------------------- shard timings


class _ShardClock:
    """Per shard: seconds in each timed call of `run_shard` (heartbeats come from the lease's thread)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.current: dict[str, Any] | None = None
        self.lock = threading.Lock()

    def add(self, phase: str, seconds: float) -> None:
        with self.lock:
            if self.current is not None:
                self.current[phase] = self.current.get(phase, 0.0) + seconds
                self.current[f"{phase}_calls"] = self.current.get(f"{phase}_calls", 0) + 1


def _timed(clock: _ShardClock, phase: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.add(phase, time.perf_counter() - t0)

    return wrapper


def install_timings(folder: Path) -> None:
    """Wrap the steps of `run_shard` with clocks and write one line per shard (bench instrumentation only)."""
    from evalfarm.scheduler import partials, records, steps

    folder.mkdir(parents=True, exist_ok=True)
    clock = _ShardClock(folder / f"{os.getpid()}.jsonl")
    for name, phase in (("claim_shard", "claim"), ("job_state", "state_check"), ("finish_shard", "finish"),
                        ("try_start_reduce", "try_reduce"), ("beat", "heartbeat")):
        setattr(records, name, _timed(clock, phase, getattr(records, name)))
    steps._open_cached = _timed(clock, "open", steps._open_cached)  # noqa: SLF001
    steps.featurize_extractors = _timed(clock, "featurize", steps.featurize_extractors)
    put = partials.RedisPartials.put
    partials.RedisPartials.put = _timed(clock, "partial_write", put)
    run_shard = steps.run_shard

    @functools.wraps(run_shard)
    def timed_run_shard(ctx: Any, job_id: str, side: str, index: int, *args: Any, **kwargs: Any) -> bool:
        with clock.lock:
            clock.current = {"job": job_id, "side": side, "index": index, "pid": os.getpid(), "start": time.time()}
        try:
            return run_shard(ctx, job_id, side, index, *args, **kwargs)
        finally:
            with clock.lock:
                record, clock.current = clock.current, None
            record["end"] = time.time()
            with open(clock.out, "a") as f:
                f.write(json.dumps(record) + "\n")

    steps.run_shard = timed_run_shard
    run_prc_tile = steps.run_prc_tile

    @functools.wraps(run_prc_tile)
    def timed_run_prc_tile(ctx: Any, job_id: str, name: str, *args: Any, **kwargs: Any) -> None:
        start = time.time()
        try:
            return run_prc_tile(ctx, job_id, name, *args, **kwargs)
        finally:
            record = {"job": job_id, "tile": name, "pid": os.getpid(), "start": start, "end": time.time()}
            with open(clock.out, "a") as f:
                f.write(json.dumps(record) + "\n")

    steps.run_prc_tile = timed_run_prc_tile


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] != "worker":
        sys.exit("usage: python bench/standin.py worker [evalfarm worker options]")
    install()
    timings = os.environ.get("EVALFARM_BENCH_TIMINGS")
    if timings:
        install_timings(Path(timings))
    from evalfarm.cli import main as cli

    sys.argv = ["evalfarm", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
