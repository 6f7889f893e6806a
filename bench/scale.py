"""Section "scale": the farm's own cost from 50k to 1M samples, with the network replaced by a stand-in.

The workers run `bench/standin.py` (a seeded linear map in place of Inception, NOT a network: the metric values
of this section mean nothing), so featurizing is nearly free and what is measured is the farm: planning, per-shard
coordination, Redis and Postgres traffic, the reducer. Real Redis (db 14) and Postgres (`test`), real worker
processes: K featurizing workers on the gpu queue and one planner/reducer on the cpu queue, each `-c 1`.

    python bench/run.py --sections scale            # 50k, 200k, 1M (about 16 minutes on 2 cores)
    python bench/scale.py [--n 50000 200000 1000000] [--workers 1 2 4] [--shard-sizes 1000 5000]

Per run: end-to-end time, shards/s sustained, the per-shard overhead (everything a shard costs but its
featurizing, the gap before the worker's next shard included) split by step, Redis memory per job, Postgres
rows and transactions per shard, the reducer's time and peak RSS; and a single-process embedded run on the same
stand-in, whose numbers the farm's must equal. One more run (`coord.*`) narrows the stand-in to 16 features, so
that shards/s then measures the farm's coordination alone, not the 2048-wide statistics' arithmetic. Ends with
one JSON line of the tracked figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import OUT_DIR, Report, section_header  # noqa: E402
from farm import DATABASE_URL, REDIS_URL, _stop, _wait_ready, services_missing  # noqa: E402

IMAGE = 16  #: tiny images: 16x16 RGB, 768 bytes each
REF_N = 50_000  #: the reference of every run (a dataset's statistics do not grow with the samples)
BATCH = 500
STANDIN = Path(__file__).resolve().parent / "standin.py"
KID = dict(kid_subsets=100, kid_subset_size=1000)
COORD_DIM = 16  #: features of the narrowed stand-in of the coordination run
EMBEDDED_MAX_N = 1_000_000  #: above this, no embedded run (its partials spill to disk, so memory allows any N)


# ---------------------------------------------------------------------------------------------- data


def write_npz(path: Path, n: int, seed: int) -> Path:
    """n 16x16 RGB uint8 images as `arr_0` of an uncompressed .npz, written in chunks (ADM's layout)."""
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    header = {"descr": "|u1", "fortran_order": False, "shape": (n, IMAGE, IMAGE, 3)}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z, \
            z.open("arr_0.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n, 50_000):
            rng = np.random.default_rng([seed, start])
            f.write(rng.integers(0, 256, (min(50_000, n - start), IMAGE, IMAGE, 3), np.uint8).tobytes())
    tmp.rename(path)
    return path


# ---------------------------------------------------------------------------------------------- processes


def env_for(root: Path, timings: Path | None = None, dim: int | None = None) -> dict[str, str]:
    env = {**os.environ, "EVALFARM_DATABASE_URL": DATABASE_URL, "EVALFARM_REDIS_URL": REDIS_URL,
           "EVALFARM_STORE": str(root / "store"), "EVALFARM_HOME": str(root / "home"), "EVALFARM_DEVICE": "cpu",
           "EVALFARM_ALLOW_DOWNLOAD": "0", "EVALFARM_RECONCILE_S": "86400", "PYTHONUNBUFFERED": "1"}
    if timings is not None:
        env["EVALFARM_BENCH_TIMINGS"] = str(timings)
    env.pop("EVALFARM_BENCH_STANDIN_DIM", None)
    if dim is not None:
        env["EVALFARM_BENCH_STANDIN_DIM"] = str(dim)
    return env


class StandInWorker:
    """`bench/standin.py worker -c 1` in its own session (started and stopped as `farm.workers` does)."""

    def __init__(self, queues: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(STANDIN), "worker", "-c", "1", "--queues", queues],
                                         env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> StandInWorker:
        _wait_ready(self.log, self.proc)
        return self

    def child_status(self, field: str) -> float | None:
        """A field of /proc/<pool child>/status in MiB (VmHWM: the child's peak RSS)."""
        pid = self.proc.pid
        try:
            [child] = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[:1]
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except (FileNotFoundError, ValueError):
            return None
        return None


class RedisPeak:
    """Redis `used_memory` sampled every 100 ms: the peak over a job, against the level before it."""

    def __init__(self, client: Any) -> None:
        self.client, self.base = client, client.info("memory")["used_memory"]
        self.peak, self._stop = self.base, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.client.info("memory")["used_memory"])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.base) / 2**20


def pg_counters(engine: Any) -> tuple[int, int]:
    """(rows inserted + updated + deleted in evalfarm's tables, transactions committed) in database `test`."""
    from sqlalchemy import text

    with engine.connect() as c:
        c.execute(text("SELECT pg_stat_force_next_flush()"))
        rows = c.execute(text("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables "
                              "WHERE relname IN ('jobs', 'shards', 'results', 'counters', 'deliveries')")).scalar()
        xacts = c.execute(text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")).scalar()
    return int(rows), int(xacts)


# ---------------------------------------------------------------------------------------------- one farm run


def wait_quietly(engine: Any, job_id: str, timeout_s: float = 3600) -> None:
    """Poll the job's state with read-only statements (rolled back, so not in `xact_commit`)."""
    from sqlalchemy import text

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with engine.connect() as c:
            state = c.execute(text("SELECT state FROM jobs WHERE id = :id"), {"id": job_id}).scalar()
        if state in ("succeeded", "failed", "cancelled"):
            if state != "succeeded":
                raise RuntimeError(f"job {job_id} {state}")
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not done after {timeout_s} s")


def _ts(dt: Any) -> float:
    from datetime import timezone

    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def shard_overheads(timings: Path, job_id: str) -> list[dict[str, float]]:
    """Per shard: its steps' seconds, and `overhead` = its wall time but featurizing, plus the gap before the
    same worker's next shard (the queue's cost: ack, fetch, the task's own job read)."""
    rows = [json.loads(line) for f in sorted(timings.glob("*.jsonl")) for line in f.read_text().splitlines()]
    rows = [r for r in rows if r["job"] == job_id and "tile" not in r]
    by_pid: dict[int, list[dict]] = {}
    for r in rows:
        by_pid.setdefault(r["pid"], []).append(r)
    for shards in by_pid.values():
        shards.sort(key=lambda r: r["start"])
        for a, b in zip(shards, shards[1:], strict=False):
            a["queue_gap"] = b["start"] - a["end"]
    for r in rows:
        r.setdefault("queue_gap", 0.0)  # a worker's last shard: nothing waited for after it
        r["overhead"] = (r["end"] - r["start"]) - r.get("featurize", 0.0) + r["queue_gap"]
    return rows


def farm_run(report: Report, root: Path, samples: Path, ref: Path, k: int, shard: int, label: str,
             engine: Any, dim: int | None = None) -> dict[str, Any]:
    import redis as redis_lib
    from sqlalchemy import select

    from evalfarm.config import EvalConfig
    from evalfarm.db import Job, Shard
    from evalfarm.farm import Farm

    timings = root / "timings" / label
    env = env_for(root, timings, dim)
    logs = OUT_DIR / "scale-logs"
    logs.mkdir(parents=True, exist_ok=True)
    client_redis = redis_lib.Redis.from_url(REDIS_URL)
    client_redis.flushdb()
    procs = [StandInWorker("cpu", env, logs / f"{label}-reducer.log")]
    procs += [StandInWorker("gpu", env, logs / f"{label}-w{i}.log") for i in range(k)]
    try:
        for p in procs:
            p.wait_ready()
        os.environ.update({k_: v for k_, v in env.items() if k_.startswith("EVALFARM_")})
        farm = Farm()
        config = EvalConfig(metrics=("is", "fid", "kid"), cache=False, shard_size=shard, batch_size=BATCH, **KID)
        rows0, xacts0 = pg_counters(engine)
        peak = RedisPeak(client_redis)
        t0 = time.time()
        job_id = farm.submit(str(samples), str(ref), config)
        wait_quietly(engine, job_id)
        t_end = time.time()
        redis_mib = peak.stop()
        reducer_rss = procs[0].child_status("VmHWM")
    finally:
        _stop([p.proc for p in procs])
    rows1, xacts1 = pg_counters(engine)
    result = farm.wait(job_id, timeout=60)
    with farm.ctx.sessions() as s:
        job = s.get(Job, job_id)
        shards = list(s.scalars(select(Shard).where(Shard.job_id == job_id)))
        started, finished = _ts(job.started_at), _ts(job.finished_at)
    n_shards = len(shards)
    first_start = min(_ts(sh.started_at) for sh in shards)
    last_end = max(_ts(sh.finished_at) for sh in shards)
    per_shard = shard_overheads(timings, job_id)
    f = report.figure
    p = f"scale.{label}"
    f(f"{p}.end_to_end_s", t_end - t0, "s")
    f(f"{p}.plan_queue_wait_plus_plan_s", first_start - t0, "s")
    f(f"{p}.shards", n_shards, "")
    f(f"{p}.shards_per_s", n_shards / (last_end - first_start), "shards/s")
    overheads = [r["overhead"] * 1000 for r in per_shard]
    f(f"{p}.overhead_ms_per_shard_median", statistics.median(overheads), "ms")
    f(f"{p}.overhead_ms_per_shard_p90", float(np.percentile(overheads, 90)), "ms")
    # The partial write hashes its files as it writes them: its time includes the digests.
    for phase in ("queue_gap", "claim", "open", "partial_write", "finish", "try_reduce", "heartbeat"):
        f(f"{p}.median_ms.{phase}", statistics.median(r.get(phase, 0.0) * 1000 for r in per_shard), "ms")
    f(f"{p}.median_ms.featurize", statistics.median(r.get("featurize", 0.0) * 1000 for r in per_shard), "ms")
    f(f"{p}.redis_mib_per_job", redis_mib, "MiB")
    f(f"{p}.pg_rows_per_shard", (rows1 - rows0) / n_shards, "rows")
    f(f"{p}.pg_transactions_per_shard", (xacts1 - xacts0) / n_shards, "xacts")
    calls = ("claim_calls", "state_check_calls", "finish_calls", "try_reduce_calls", "heartbeat_calls")
    f(f"{p}.db_calls_in_run_shard_median", statistics.median(sum(r.get(c, 0) for c in calls) for r in per_shard), "")
    f(f"{p}.reducer_s", finished - last_end, "s")
    f(f"{p}.reducer_peak_rss_mib", reducer_rss, "MiB")
    report.note(f"{label}: job {job_id}, planning started {started - t0:.2f} s after submit; reducer RSS is the "
                "planner/reducer pool child's VmHWM (it also planned)")
    return {k_: result[k_] for k_ in ("inception_score_mean", "frechet_inception_distance",
                                       "kernel_inception_distance_mean")} | {"end_to_end_s": t_end - t0}


# ---------------------------------------------------------------------------------------------- embedded, planning


def child_embedded(samples: str, ref: str, shard: int, home: str) -> dict[str, Any]:
    import standin

    standin.install()
    os.environ["EVALFARM_HOME"] = home
    import evalfarm

    t0 = time.perf_counter()
    result = evalfarm.evaluate(samples, ref, cache=False, shard_size=shard, batch_size=BATCH, device="cpu",
                               metrics=("is", "fid", "kid"), **KID)
    seconds = time.perf_counter() - t0
    with open(f"/proc/{os.getpid()}/status") as fh:
        hwm = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    return {k: result[k] for k in ("inception_score_mean", "frechet_inception_distance",
                                   "kernel_inception_distance_mean")} | {"seconds": seconds, "peak_rss_mib": hwm}


def embedded(report: Report, root: Path, samples: Path, ref: Path, shard: int, label: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "embedded", str(samples), str(ref), str(shard), str(root / f"home-{label}")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env_for(root))
    if out.returncode != 0:  # e.g. killed for memory: the embedded runner keeps every partial in memory
        report.figure(f"scale.{label}.embedded_s", None, "s")
        report.note(f"embedded {label} failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
        return {}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    report.figure(f"scale.{label}.embedded_s", res["seconds"], "s")
    report.figure(f"scale.{label}.embedded_peak_rss_mib", res["peak_rss_mib"], "MiB")
    return res


def write_floor(report: Report, root: Path, dim: int = 2048, repeat: int = 7) -> None:
    """What writing a shard's Gram triangle (dim = 2048: 16 MiB) costs this machine's page cache alone, as a new
    file (as a partial is written) and over a file's cached pages: the floor under `partial_write`."""
    data = os.urandom(dim * (dim + 1) // 2 * 8)
    folder = root / "write-floor"
    folder.mkdir(parents=True, exist_ok=True)
    new, over = [], []
    for i in range(repeat):
        t0 = time.perf_counter()
        with open(folder / f"{i}.bin", "wb") as f:
            f.write(data)
        new.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with open(folder / f"{i}.bin", "r+b") as f:
            f.write(data)
        over.append(time.perf_counter() - t0)
    for i in range(repeat):
        (folder / f"{i}.bin").unlink()
    report.figure("scale.machine.write_gram_new_file_ms", statistics.median(new) * 1000, "ms")
    report.figure("scale.machine.write_gram_over_cached_pages_ms", statistics.median(over) * 1000, "ms")


def kid_draw_time(report: Report, n: int, ref_n: int) -> None:
    """KID's draw at these sizes: what the first shard of a new draw pays once (`scheduler.kid_rows`)."""
    from evalfarm.metrics.kid import drawn_rows

    t0 = time.perf_counter()
    ones, twos = drawn_rows(n, ref_n, **{k.removeprefix("kid_"): v for k, v in KID.items()}, seed=2020)
    report.figure(f"scale.kid_draw_s_{label_of(n)}", time.perf_counter() - t0, "s")
    report.figure(f"scale.kid_drawn_fraction_{label_of(n)}", len(ones) / n, "")


def plan_time(report: Report, samples: Path, label: str) -> float:
    """`plan_samples` as the planner calls it (open, count from the header, content hash, shard ranges)."""
    out = subprocess.run([sys.executable, __file__, "plan", str(samples)], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    report.figure(f"scale.plan_s_{label}", res["seconds"], "s")
    report.figure(f"scale.plan_hash_s_{label}", res["hash_s"], "s")
    return res["seconds"]


def child_plan(samples: str) -> dict[str, Any]:
    from evalfarm.config import EvalConfig
    from evalfarm.scheduler.plan import plan_samples
    from evalfarm.sources import SampleRoots, open_source

    t0 = time.perf_counter()
    plan = plan_samples(samples, EvalConfig(shard_size=5000), SampleRoots.unrestricted())
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    open_source(samples).content_hash()
    return {"seconds": seconds, "n": plan.n, "shards": len(plan.shards), "hash_s": time.perf_counter() - t1}


# ---------------------------------------------------------------------------------------------- the section


def label_of(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


def run(report: Report, *, root: Path, quick: bool = False, ns: list[int] | None = None,
        workers: list[int] | None = None, shard_sizes: list[int] | None = None) -> dict[str, Any]:
    section_header("scale: the farm's own cost on a stand-in network (Redis db 14, Postgres `test`)")
    report.note("workers featurize with bench/standin.py: NOT a network; the metric values here mean nothing")
    missing = services_missing()
    if missing:
        print(f"scale: skipped ({missing})", flush=True)
        return {}
    import sqlalchemy

    ns = ns or ([5_000, 20_000] if quick else [50_000, 200_000, 1_000_000])
    workers = workers or ([1, 2] if quick else [1, 2, 4])
    shard_sizes = shard_sizes or ([500, 1000] if quick else [1000, 5000])
    ref_n = min(REF_N, ns[0])
    data = root / "scale-data"
    data.mkdir(parents=True, exist_ok=True)
    ref = write_npz(data / f"ref-{ref_n}.npz", ref_n, seed=2)
    sets = {n: write_npz(data / f"samples-{n}.npz", n, seed=1) for n in ns}
    engine = sqlalchemy.create_engine(DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    tracked: dict[str, Any] = {}
    for n in ns:
        tracked[f"plan_s_{label_of(n)}"] = plan_time(report, sets[n], label_of(n))
    write_floor(report, root)
    kid_draw_time(report, ns[-1], ref_n)
    small, big = ns[0], ns[-1]
    report.note(f"reference: {ref_n} images; samples {', '.join(map(label_of, ns))}; 16x16 npz; batch {BATCH}; "
                f"IS+FID+KID ({KID['kid_subsets']} x {KID['kid_subset_size']}), cache off")
    expected = embedded(report, root, sets[small], ref, shard_sizes[-1], f"{label_of(small)}")
    runs: dict[str, dict[str, Any]] = {}
    for shard in shard_sizes:
        for k in workers:
            label = f"{label_of(small)}.s{shard}.w{k}"
            runs[label] = farm_run(report, root, sets[small], ref, k, shard, label, engine)
    kmax, smax = workers[-1], shard_sizes[-1]
    for n in ns[1:]:
        label = f"{label_of(n)}.s{smax}.w{kmax}"
        runs[label] = farm_run(report, root, sets[n], ref, kmax, smax, label, engine)
    # The overhead a shard costs its worker, at the largest N, with the worker not sharing its cores with
    # other featurizing workers (a GPU host runs one worker per GPU, each with cores of its own); the runs with
    # more workers than these 2 cores measure the overhead plus the wait for a core.
    solo = f"{label_of(big)}.s{smax}.w1"
    if big != small and 1 in workers:
        runs[solo] = farm_run(report, root, sets[big], ref, 1, smax, solo, engine)
    if big == small:
        big_embedded = expected
    elif big <= EMBEDDED_MAX_N:
        big_embedded = embedded(report, root, sets[big], ref, smax, label_of(big))
    else:
        big_embedded = {}
        report.note(f"no embedded run of {label_of(big)}: above EMBEDDED_MAX_N, to keep the section's time")
    for label, res in runs.items():
        want = expected if label.startswith(label_of(small) + ".") else big_embedded
        if want and (label.startswith(label_of(big) + ".") or label.startswith(label_of(small) + ".")):
            same = all(abs(res[k] - want[k]) <= 1e-6 * max(1.0, abs(want[k])) for k in want if k in res
                       and k not in ("seconds", "peak_rss_mib", "end_to_end_s"))
            report.figure(f"scale.{label}.equals_embedded", "yes" if same else "NO")
    # The farm's coordination alone: the same run with a stand-in of COORD_DIM features, whose statistics and
    # partial files cost next to nothing (its numbers are compared with nothing; they mean nothing either).
    coord = f"coord.{label_of(small)}.s{shard_sizes[0]}.w{kmax}"
    report.note(f"{coord}: the stand-in narrowed to {COORD_DIM} features (EVALFARM_BENCH_STANDIN_DIM): "
                "what is left per shard is claiming, finishing, the broker and the partial's record")
    farm_run(report, root, sets[small], ref, kmax, shard_sizes[0], coord, engine, dim=COORD_DIM)
    best = f"{label_of(small)}.s{shard_sizes[0]}.w{kmax}"
    at_big = f"{label_of(big)}.s{smax}.w{kmax}"
    tracked.update(
        overhead_ms_per_shard_median=report.get(f"scale.{solo}.overhead_ms_per_shard_median"),
        overhead_ms_per_shard_median_4_workers=report.get(f"scale.{at_big}.overhead_ms_per_shard_median")
        if kmax == 4 else None,
        shards_per_s_4_workers=report.get(f"scale.{best}.shards_per_s") if kmax == 4 else None,
        coordinated_shards_per_s_4_workers=report.get(f"scale.{coord}.shards_per_s") if kmax == 4 else None,
        reducer_s_1m=report.get(f"scale.{at_big}.reducer_s") if big == 1_000_000 else None,
        reducer_peak_rss_mb_1m=report.get(f"scale.{at_big}.reducer_peak_rss_mib") if big == 1_000_000 else None,
        plan_s_1m=tracked.get("plan_s_1m"),
        end_to_end_over_embedded_1m=(runs[at_big]["end_to_end_s"] / big_embedded["seconds"]
                                     if big == 1_000_000 and big_embedded else None),
    )
    return tracked


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "embedded":
        print(json.dumps(child_embedded(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "plan":
        print(json.dumps(child_plan(sys.argv[2])))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+")
    p.add_argument("--workers", type=int, nargs="+")
    p.add_argument("--shard-sizes", type=int, nargs="+")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--root", type=Path, default=OUT_DIR / "scale")
    args = p.parse_args()
    report = Report()
    t0 = time.perf_counter()
    tracked = run(report, root=args.root, quick=args.quick, ns=args.n, workers=args.workers,
                  shard_sizes=args.shard_sizes)
    print(f"scale section: {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"scale": tracked}))


if __name__ == "__main__":
    main()
