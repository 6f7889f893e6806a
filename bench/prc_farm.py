"""Precision/recall spread over farm workers, beside torch-fidelity and evalfarm in one process, same features.

The farm's workers featurize with `bench/standin.py` in place of VGG16 (4096 features; NOT a network, so the
values mean nothing), which makes featurizing cheap and leaves PRC's tiles, the part measured here. The same
stand-in features, computed here the way a shard computes them, are written to `.npy` files, and
torch-fidelity's `prc_features_to_metric` and evalfarm's in-process `precision_recall` run on them in fresh
processes (`bench/prc.py`'s children). The farm: real Redis (db 14), Postgres (`test`), one planner/reducer
worker on the cpu queue and K tile workers on the gpu queue, each `-c 1`; a job `--metrics prc --extractor
vgg16` on `.npz` sets of 16x16 images.

    python bench/prc_farm.py [--n 5000 20000] [--workers 1 2 4] [--tile 10000] [--block 10000] [--tf-max-n 20000]

Per run: the tile phase (first tile's start to last tile's end, from the workers' timings), the job end to
end, the tile workers' peak RSS (largest pool child's VmHWM; it also featurized), and whether the three numbers
equal torch-fidelity's and the in-process run's. On this 2-core machine the workers share the cores, so
more workers cannot be faster here: the figures show what distributing costs, not what it gains on more GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import OUT_DIR  # noqa: E402
from farm import DATABASE_URL, REDIS_URL, _stop, services_missing  # noqa: E402
from prc import KEYS, mem_available_bytes, run_child  # noqa: E402
from scale import BATCH, StandInWorker, env_for, wait_quietly, write_npz  # noqa: E402

SHARD = 5000


def standin_features(npz: Path, out: Path) -> Path:
    """The stand-in's VGG16-shaped features of every image, batch by batch from each shard's start, as a shard
    computes them (same batches, so the same floats)."""
    import standin
    import torch

    from evalfarm.sources import open_source

    source, net = open_source(str(npz)), standin.StandIn("vgg16")
    rows = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(len(source), net.dim))
    for lo in range(0, len(source), BATCH):
        images = source.read(lo, min(len(source), lo + BATCH))
        rows[lo : lo + len(images)] = net(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    rows.flush()
    del rows
    return out


def tile_span(timings: Path, job_id: str) -> tuple[float, int, float]:
    """(seconds from the first tile's start to the last one's end, tiles run, summed tile seconds)."""
    rows = [json.loads(line) for f in timings.glob("*.jsonl") for line in f.read_text().splitlines()]
    tiles = [r for r in rows if r["job"] == job_id and "tile" in r]
    return (max(r["end"] for r in tiles) - min(r["start"] for r in tiles), len(tiles),
            sum(r["end"] - r["start"] for r in tiles))


def farm_prc(root: Path, gen: Path, real: Path, k: int, tile: int, block: int, label: str) -> dict[str, Any]:
    import redis
    import sqlalchemy

    from evalfarm.config import EvalConfig
    from evalfarm.farm import Farm

    timings = root / "timings" / label
    env = env_for(root, timings)
    logs = OUT_DIR / "prc-farm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    redis.Redis.from_url(REDIS_URL).flushdb()
    procs = [StandInWorker("cpu", env, logs / f"{label}-reducer.log")]
    procs += [StandInWorker("gpu", env, logs / f"{label}-w{i}.log") for i in range(k)]
    engine = sqlalchemy.create_engine(DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        for p in procs:
            p.wait_ready()
        os.environ.update({k_: v for k_, v in env.items() if k_.startswith("EVALFARM_")})
        farm = Farm()
        config = EvalConfig(metrics=("prc",), extractors=("vgg16",), cache=False, shard_size=SHARD,
                            batch_size=BATCH, prc_tile=tile, prc_block=block)
        t0 = time.time()
        job_id = farm.submit(str(gen), str(real), config)
        wait_quietly(engine, job_id)
        seconds = time.time() - t0
        peak = max(p.child_status("VmHWM") or 0.0 for p in procs[1:])
    finally:
        _stop([p.proc for p in procs])
    result = farm.wait(job_id, timeout=60)
    span, n_tiles, busy = tile_span(timings, job_id)
    return {**{key: result[key] for key in ("precision", "recall", "f_score")}, "end_to_end_s": seconds,
            "tiles_s": span, "tiles": n_tiles, "tile_busy_s": busy, "peak_rss_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[5000, 20000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tile", type=int, default=10000)
    p.add_argument("--block", type=int, default=10000)
    p.add_argument("--tf-max-n", type=int, default=20000, help="run torch-fidelity up to this N")
    p.add_argument("--root", type=Path, default=OUT_DIR / "prc-farm")
    args = p.parse_args()
    missing = services_missing()
    if missing:
        sys.exit(f"prc_farm: {missing}")
    print(f"# bench/prc_farm.py {' '.join(sys.argv[1:])}")
    print("# workers featurize with bench/standin.py in place of VGG16: NOT a network, the values mean nothing")
    root = args.root
    (root / "data").mkdir(parents=True, exist_ok=True)
    figures: list[dict[str, Any]] = []
    head = f"{'config':<22}{'N':>7}{'tiles s':>9}{'job s':>8}{'tiles':>7}{'peak RSS MiB':>14}" \
           f"{'precision':>11}{'recall':>10}{'f_score':>10}  equals"
    print(head)
    for n in args.n:
        gen = write_npz(root / "data" / f"gen-{n}.npz", n, seed=1)
        real = write_npz(root / "data" / f"real-{n}.npz", n, seed=2)
        with tempfile.TemporaryDirectory(prefix="evalfarm-prc-farm-") as tmp:
            fg = standin_features(gen, Path(tmp) / "gen.npy")
            fr = standin_features(real, Path(tmp) / "real.npy")
            inproc: dict[str, dict[str, Any]] = {}
            modes = ["evalfarm"]
            if n <= args.tf_max_n:
                modes.insert(0, "tf-full" if 9 * n * n < 0.6 * mem_available_bytes() else "tf-part")
            for mode in modes:
                inproc[mode] = run_child([mode, "--gen", str(fg), "--real", str(fr), "--n", str(n),
                                          "--tile", str(args.tile), "--block", str(args.block)])
        ref_mode = modes[0]
        for mode, res in inproc.items():
            same = "-" if mode == ref_mode else ("yes" if all(res[k] == inproc[ref_mode][k] for k in KEYS) else "NO")
            print(f"{mode:<22}{n:>7}{res['seconds']:>9.1f}{'':>8}{'':>7}{res['peak_rss_mib']:>14.0f}"
                  f"{res['precision']:>11.6f}{res['recall']:>10.6f}{res['f_score']:>10.6f}  {same}", flush=True)
            figures.append({"config": mode, "n": n, **res})
        for k in args.workers:
            res = farm_prc(root, gen, real, k, args.tile, args.block, f"n{n}-w{k}")
            same = "yes" if all(res[key] == inproc[m][key] for m in inproc for key in KEYS) else "NO"
            print(f"{f'farm, {k} worker(s)':<22}{n:>7}{res['tiles_s']:>9.1f}{res['end_to_end_s']:>8.1f}"
                  f"{res['tiles']:>7}{res['peak_rss_mib']:>14.0f}{res['precision']:>11.6f}{res['recall']:>10.6f}"
                  f"{res['f_score']:>10.6f}  {same}", flush=True)
            figures.append({"config": f"farm-w{k}", "n": n, "equals_in_process": same, **res})
    print(json.dumps({"prc_farm": figures}))


if __name__ == "__main__":
    main()
