"""Section 3: peak memory of a worker featurizing growing N, and of the reducer merging growing N.

Each measurement runs in a fresh subprocess (this file, run with `worker` or `reducer`), so `ru_maxrss` is
the peak of that N alone. A worker featurizing one shard must stay flat in N (only the shard's own
features, 8 KiB per image, grow); the reducer's IS/FID merge must not depend on N either: evalfarm sums
the K = N / shard_size partials as it reads them (`merge_in_order`). Loading all K first, as evalfarm did
before, is measured beside it.

    python bench/memory.py worker --npz FILE --n N --weights FILE [--device cpu] [--batch-size 64]
    python bench/memory.py reducer --n N --shard-size S [--load-all]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    Report,
    children_peak_rss_mib,
    peak_rss_mib,
    python,
    section_header,
    write_npz_set,
)

SHARD_SIZE = 5000  #: evalfarm's DEFAULT_SHARD_SIZE
DIM, SPLITS, CLASSES = 2048, 10, 1008


# ---------------------------------------------------------------------------------------------- children


def child_worker(npz: str, n: int, weights: str, device: str, batch_size: int) -> dict:
    """What a farm worker process does for one shard of n images: build the network, featurize_range."""
    from evalfarm.metrics import split_assignment
    from evalfarm.models import FeatureExtractor
    from evalfarm.models.weights import Weights, file_sha256
    from evalfarm.pipeline import featurize_range
    from evalfarm.sources import open_source

    extractor = FeatureExtractor(Weights(Path(weights), file_sha256(Path(weights))), device, "fp32")
    baseline = peak_rss_mib()
    source = open_source(npz)
    t0 = time.perf_counter()
    out = featurize_range(source, 0, n, extractor, batch_size=batch_size,
                          split_ids=split_assignment(n, SPLITS, 2020), splits=SPLITS)
    return {
        "n": out.n,
        "seconds": time.perf_counter() - t0,
        "after_model_rss_mib": baseline,
        "peak_rss_mib": peak_rss_mib(),
        "loader_workers_peak_rss_mib": children_peak_rss_mib(),
    }


def _one_partial(rng: np.random.Generator, base_gram: np.ndarray, rows: int) -> object:
    """A shard's statistics as the store returns them: FID sums (a fresh 32 MiB Gram) and IS split sums."""
    from evalfarm.metrics import FeatureStats

    split = FeatureStats.of(np.zeros((64, 1)), rng.standard_normal((64, CLASSES)) * 3, rng.integers(0, SPLITS, 64),
                            SPLITS, keep_features=False)
    return FeatureStats(rows, rng.random(DIM) * rows, base_gram.copy(), split_n=split.split_n, split_p=split.split_p,
                        split_plogp=split.split_plogp)


def child_reducer(n: int, shard_size: int, load_all: bool) -> dict:
    """The samples side of an IS/FID reduce over K = ceil(n / shard_size) partials (features not loaded).

    By default as `reduce_job` does it: each partial is summed by `merge_in_order` as it arrives and dropped.
    `load_all` holds every partial in a list first, then sums them (the scheme the streaming merge replaced).
    """
    from evalfarm.metrics import inception_score
    from evalfarm.pipeline import merge_in_order

    rng = np.random.default_rng(0)
    x = rng.standard_normal((DIM + 64, DIM))
    base_gram = x.T @ x
    del x
    k = math.ceil(n / shard_size)
    baseline = peak_rss_mib()
    t0 = time.perf_counter()
    if load_all:
        parts = [_one_partial(rng, base_gram, shard_size) for _ in range(k)]
        side = merge_in_order(parts)
    else:
        side = merge_in_order(_one_partial(rng, base_gram, shard_size) for _ in range(k))
    inception_score(side)
    return {"n": n, "k": k, "seconds": time.perf_counter() - t0, "baseline_rss_mib": baseline,
            "peak_rss_mib": peak_rss_mib()}


def child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("worker", "reducer"))
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--npz")
    p.add_argument("--weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE)
    p.add_argument("--load-all", action="store_true")
    a = p.parse_args(argv)
    if a.mode == "worker":
        result = child_worker(a.npz, a.n, a.weights, a.device, a.batch_size)
    else:
        result = child_reducer(a.n, a.shard_size, a.load_all)
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------- parent


def run_child(*args: str) -> dict:
    """Run this file as a fresh process; its last stdout line is the JSON result."""
    proc = subprocess.run([python(), __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flatness(report: Report, name: str, values: list[float]) -> None:
    report.figure(name, max(values) / min(values), "x")


def bench_worker(report: Report, root: Path, weights: Path, device: str, quick: bool) -> None:
    # N starts at two batches: the first forward passes grow glibc's heap (~10% over one batch), then it is flat.
    ns, batch = ((32, 64, 128), 16) if quick else ((128, 256, 512), 64)
    npz = write_npz_set(root / "memory" / "samples.npz", max(ns), 32, seed=5)
    report.note(f"worker: featurize_range over the first N of a 32x32 .npz, batch {batch}, one fresh process per N "
                "(N >= 2 batches: one batch alone sits ~10% lower, before the allocator's heap settles)")
    peaks, loaders = [], []
    for n in ns:
        r = run_child("worker", "--npz", str(npz), "--n", str(n), "--weights", str(weights), "--device", device,
                      "--batch-size", str(batch))
        report.figure(f"memory.worker.N{n}.after_model_rss_mib", r["after_model_rss_mib"], "MiB")
        peaks.append(report.figure(f"memory.worker.N{n}.peak_rss_mib", r["peak_rss_mib"], "MiB"))
        loaders.append(report.figure(f"memory.worker.N{n}.loader_worker_peak_rss_mib",
                                     r["loader_workers_peak_rss_mib"], "MiB"))
    flatness(report, "memory.worker.rss_max_over_min", peaks)
    slope = (peaks[-1] - peaks[0]) * 1024 / (ns[-1] - ns[0])
    report.figure("memory.worker.rss_slope_kib_per_image", slope, "KiB/image")
    report.note("a shard's own features are 8 KiB/image (2048 float32): the floor of any slope")
    flatness(report, "memory.worker.loader_rss_max_over_min", loaders)


def bench_reducer(report: Report, quick: bool) -> None:
    ns = (10_000, 20_000, 40_000) if quick else (50_000, 100_000, 200_000)
    report.note(f"reducer: IS/FID merge of the samples side, shard size {SHARD_SIZE}: evalfarm's streaming merge_in_order "
                "vs loading every partial first (the scheme it replaced); FID's eigen step adds a constant (section 2)")
    for how, flag in (("evalfarm", ()), ("load_all", ("--load-all",))):
        peaks = []
        for n in ns:
            r = run_child("reducer", "--n", str(n), "--shard-size", str(SHARD_SIZE), *flag)
            peaks.append(report.figure(f"memory.reducer.{how}.N{n}_K{r['k']}.peak_rss_mib", r["peak_rss_mib"], "MiB"))
        flatness(report, f"memory.reducer.{how}.rss_max_over_min", peaks)


def run(report: Report, *, root: Path, weights: Path, device: str, quick: bool) -> None:
    section_header("3. memory: worker and reducer peak RSS vs N (fresh process per N)")
    bench_worker(report, root, weights, device, quick)
    bench_reducer(report, quick)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
