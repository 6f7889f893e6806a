"""Precision/recall (PRC) at scale: torch-fidelity's single-process PRC beside evalfarm's tiled PRC.

Features are seeded float32 stand-ins for VGG16 fc2_relu (non-negative, with exact zeros), written once per
run into a temp `.npy` per side and memory-mapped. Every configuration runs in a fresh subprocess (this file,
`child ...`), so its peak RSS is its own: VmHWM (anonymous and file-backed pages) and a sampled peak of
anonymous pages (a memory-mapped feature file's pages are file-backed and reclaimable).

    python bench/prc.py [--n 5000 20000 50000] [--dim 4096] [--tile 10000] [--block 10000]
                        [--small-block 2048] [--cbwr] [--budget-s 900]

Configurations per N:
- `tf-full`: torch-fidelity `prc_features_to_metric(save_cpu_ram=False)`, its default: three n² float32
  matrices in memory (skipped where ~9·n² bytes do not fit in 60% of the available memory);
- `tf-part`: the same with `save_cpu_ram=True`, its memory-saving path (four distance passes);
- `evalfarm`: `evalfarm.metrics.prc.precision_recall` (tiled, in process), block = torch-fidelity's batch;
- `evalfarm-b{B}` (`--small-block`): the same with a smaller block, i.e. smaller farm tiles;
- `evalfarm-cbwr` (`--cbwr`): the same under `MKL_CBWR=AVX2,STRICT` (GEMM rounding independent of threads).
A configuration whose time, extrapolated as n² from the smallest N, exceeds `--budget-s` is skipped and said so.
The first N also measures what the block grid costs against one plain `cdist` (`blocks` child).
Ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

SEED = 2020
CHUNK = 1000  #: rows generated per seeded chunk, so the first N rows do not depend on the largest N
KEYS = ("precision", "recall", "f_score")


# ---------------------------------------------------------------------------------------------- inputs


def write_features(path: Path, n: int, dim: int, side: int) -> None:
    """n × dim float32 ReLU'd normals (side 0 generated, slightly shifted; side 1 real), chunk by chunk."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    shift = 0.02 if side == 0 else 0.0
    for start in range(0, n, CHUNK):
        rng = np.random.default_rng([SEED, side, start // CHUNK])
        rows = min(CHUNK, n - start)
        out[start : start + rows] = np.maximum(rng.standard_normal((rows, dim), np.float32) + shift, 0)
    out.flush()
    del out


# ---------------------------------------------------------------------------------------------- memory


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Samples RssAnon every 20 ms: the peak of private memory, without the mapped feature file's pages."""

    def __init__(self) -> None:
        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status("RssAnon"))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


# ---------------------------------------------------------------------------------------------- children


def child_prc(mode: str, gen_path: str, real_path: str, n: int, tile: int, block: int) -> dict:
    import torch

    gen = np.load(gen_path, mmap_mode="r")[:n]
    real = np.load(real_path, mmap_mode="r")[:n]
    baseline = _status("VmRSS")
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        if mode.startswith("tf-"):
            from torch_fidelity.metric_prc import prc_features_to_metric

            # torch-fidelity holds its features as tensors in memory: read them as its extractor would leave them.
            g, r = torch.from_numpy(np.array(gen)), torch.from_numpy(np.array(real))
            out = prc_features_to_metric(
                g, r, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=mode == "tf-part", verbose=False
            )
        else:
            from evalfarm.metrics.prc import precision_recall

            out = precision_recall(gen, real, neighborhood=3, tile=tile, block=block)
        seconds = time.perf_counter() - t0
    return {
        **{k: out[k] for k in KEYS},
        "seconds": seconds,
        "peak_rss_mib": _status("VmHWM"),
        "peak_anon_mib": anon.peak,
        "baseline_rss_mib": baseline,
        "torch_threads": torch.get_num_threads(),
    }


def child_blocks(gen_path: str, n: int, tile_blocks: list[int]) -> dict:
    """The cost of the block grid: one plain cdist of n × n against the same matrix computed block by block,
    for distances alone and for radii (k+1 smallest per row); and how many pair distances a tiling without
    the grid (per-tile cdist, 3 tiles a side) changes."""
    import torch

    from evalfarm.metrics.prc import nearest_tile

    x = torch.from_numpy(np.array(np.load(gen_path, mmap_mode="r")[:n]))
    torch.cdist(x[:500], x[:500])  # warm up MKL
    res: dict = {"n": n}

    def best_of_2(fn) -> float:  # the less disturbed of two runs on a shared machine
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def blocked(b: int) -> None:
        for rs in range(0, n, b):
            for cs in range(0, n, b):
                torch.cdist(x[rs : rs + b], x[cs : cs + b])

    whole = torch.cdist(x, x)
    res["plain_cdist_s"] = best_of_2(lambda: torch.cdist(x, x))
    res["plain_kthvalue_s"] = best_of_2(lambda: whole.kthvalue(4, dim=1))
    for b in tile_blocks:
        res[f"block{b}_cdist_s"] = best_of_2(lambda b=b: blocked(b))
        res[f"block{b}_nearest_s"] = best_of_2(lambda b=b: nearest_tile(x.numpy(), x.numpy(), neighborhood=3, block=b))

    t = math.ceil(n / 3)
    naive = torch.cat(
        [torch.cat([torch.cdist(x[r : r + t], x[c : c + t]) for c in range(0, n, t)], 1) for r in range(0, n, t)]
    )
    res["naive_tiles3_pairs_differing"] = int((naive != whole).sum())
    res["pairs"] = n * n
    return res


# ---------------------------------------------------------------------------------------------- parent


def run_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fmt_row(cols: list[object], widths: list[int]) -> str:
    return "  ".join(
        str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=False))
    )


HEAD = ["config", "N", "time s", "peak RSS MiB", "peak anon MiB", "precision", "recall", "f_score", "= tf"]
WIDTHS = [16, 6, 8, 12, 13, 10, 10, 10, 6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("child")
    child.add_argument("mode")
    child.add_argument("--gen", required=True)
    child.add_argument("--real")
    child.add_argument("--n", type=int, required=True)
    child.add_argument("--tile", type=int, default=10000)
    child.add_argument("--block", type=int, default=10000)
    child.add_argument("--blocks", type=int, nargs="*", default=[])
    parser.add_argument("--n", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--dim", type=int, default=4096, help="feature dimension (VGG16 fc2_relu: 4096)")
    parser.add_argument("--tile", type=int, default=10000, help="evalfarm tile (a multiple of --block)")
    parser.add_argument("--block", type=int, default=10000, help="evalfarm block (torch-fidelity batch: 10000)")
    parser.add_argument("--small-block", type=int, default=2048, help="also run evalfarm with this block (0: no)")
    parser.add_argument("--cbwr", action="store_true", help="also run evalfarm under MKL_CBWR=AVX2,STRICT")
    parser.add_argument("--cost-blocks", type=int, nargs="*", default=[2048, 1024, 512, 256])
    parser.add_argument("--budget-s", type=float, default=900, help="skip a configuration estimated to run longer")
    parser.add_argument(
        "--configs", nargs="+", help="run only these (tf-full tf-part evalfarm evalfarm-bB evalfarm-cbwr)"
    )
    args = parser.parse_args()

    if args.cmd == "child":
        if args.mode == "blocks":
            out = child_blocks(args.gen, args.n, args.blocks)
        else:
            out = child_prc(args.mode, args.gen, args.real, args.n, args.tile, args.block)
        print(json.dumps(out))
        return

    import torch

    ns = sorted(args.n)
    print(f"# bench/prc.py {' '.join(sys.argv[1:])}")
    print(
        f"# machine: nproc={os.cpu_count()} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"load={' '.join(f'{x:.2f}' for x in os.getloadavg())} mem_available={mem_available_bytes() / 2**30:.1f} GiB"
    )
    configs = ["tf-full", "tf-part", "evalfarm"]
    if args.small_block:
        configs.append(f"evalfarm-b{args.small_block}")
    if args.cbwr:
        configs.append("evalfarm-cbwr")
    if args.configs:
        configs = [c for c in args.configs if c in configs]
    figures: dict = {"dim": args.dim, "tile": args.tile, "block": args.block, "runs": [], "skipped": []}

    with tempfile.TemporaryDirectory(prefix="evalfarm-prc-") as tmp:
        gen_path, real_path = Path(tmp) / "gen.npy", Path(tmp) / "real.npy"
        t0 = time.perf_counter()
        write_features(gen_path, ns[-1], args.dim, 0)
        write_features(real_path, ns[-1], args.dim, 1)
        print(f"# features: 2 × {ns[-1]} × {args.dim} float32 written in {time.perf_counter() - t0:.1f} s")

        if args.cost_blocks:
            n0 = ns[0]
            cost = run_child(
                ["blocks", "--gen", str(gen_path), "--n", str(n0), "--blocks", *map(str, args.cost_blocks)]
            )
            figures["block_cost"] = cost
            print(f"\n## cost of the block grid, {n0} × {n0} × {args.dim} (one distance matrix)")
            if "error" in cost:
                print(f"  failed: {cost['error']}")
            else:
                print(f"  plain cdist: {cost['plain_cdist_s']:.2f} s, + kthvalue {cost['plain_kthvalue_s']:.2f} s")
                for b in args.cost_blocks:
                    print(
                        f"  block {b:5d}: cdist {cost[f'block{b}_cdist_s']:.2f} s "
                        f"({cost[f'block{b}_cdist_s'] / cost['plain_cdist_s']:.2f}× plain), nearest_tile "
                        f"{cost[f'block{b}_nearest_s']:.2f} s "
                        f"({cost[f'block{b}_nearest_s'] / (cost['plain_cdist_s'] + cost['plain_kthvalue_s']):.2f}× "
                        f"cdist+kthvalue)"
                    )
                print(
                    f"  per-tile cdist without the grid (3 tiles a side): {cost['naive_tiles3_pairs_differing']} of "
                    f"{cost['pairs']} pair distances differ from the whole-matrix cdist"
                )

        print()
        print(fmt_row(HEAD, WIDTHS))
        per_n_s: dict[str, tuple[int, float]] = {}  # config -> (n, seconds) of its smallest run, to extrapolate
        for n in ns:
            results: dict[str, dict] = {}
            for config in configs:
                reason = None
                if config == "tf-full" and 9 * n * n > 0.6 * mem_available_bytes():
                    reason = f"needs ~{9 * n * n / 2**30:.0f} GiB (three {n}² float32 matrices and copies)"
                elif config in per_n_s:
                    n0, s0 = per_n_s[config]
                    estimate = s0 * (n / n0) ** 2
                    if estimate > args.budget_s:
                        reason = f"estimated {estimate:.0f} s > budget {args.budget_s:.0f} s"
                if reason:
                    figures["skipped"].append({"config": config, "n": n, "why": reason})
                    print(fmt_row([config, n, "skipped: " + reason], WIDTHS[:2] + [0]))
                    continue
                env, tile, block = None, args.tile, args.block
                if config.startswith("evalfarm-b"):
                    block = args.small_block
                    tile = max(block, args.tile // block * block)
                if config == "evalfarm-cbwr":
                    env = {"MKL_CBWR": "AVX2,STRICT"}
                res = run_child(
                    [
                        config,
                        "--gen",
                        str(gen_path),
                        "--real",
                        str(real_path),
                        "--n",
                        str(n),
                        "--tile",
                        str(tile),
                        "--block",
                        str(block),
                    ],
                    env,
                )
                if "error" in res:
                    print(fmt_row([config, n, "failed: " + res["error"]], WIDTHS[:2] + [0]))
                    figures["runs"].append({"config": config, "n": n, **res})
                    continue
                results[config] = res
                per_n_s.setdefault(config, (n, res["seconds"]))
                ref = results.get("tf-full") or results.get("tf-part")
                same = (
                    ""
                    if ref is None or config.startswith("tf-")
                    else ("yes" if all(res[k] == ref[k] for k in KEYS) else "NO")
                )
                if config == "tf-part" and "tf-full" in results:
                    same = "yes" if all(res[k] == results["tf-full"][k] for k in KEYS) else "NO"
                res.update(config=config, n=n, tile=tile, block=block, equals_torch_fidelity=same or None)
                figures["runs"].append(res)
                print(
                    fmt_row(
                        [
                            config,
                            n,
                            f"{res['seconds']:.1f}",
                            f"{res['peak_rss_mib']:.0f}",
                            f"{res['peak_anon_mib']:.0f}",
                            f"{res['precision']:.6f}",
                            f"{res['recall']:.6f}",
                            f"{res['f_score']:.6f}",
                            same or "-",
                        ],
                        WIDTHS,
                    )
                )
            for config, res in results.items():
                # Where torch-fidelity was skipped, the default block (its own cdist calls) is the reference.
                ref_name = next((c for c in ("tf-full", "tf-part", "evalfarm") if c in results), None)
                if config.startswith("evalfarm") and ref_name not in (None, config):
                    ref = results[ref_name]
                    diff = {k: res[k] - ref[k] for k in KEYS if res[k] != ref[k]}
                    print(
                        f"  # {config} vs {ref_name} at N={n}: "
                        + (", ".join(f"{k} {v:+.3g}" for k, v in diff.items()) if diff else "identical")
                    )
    print(json.dumps({"prc_bench": figures}))


if __name__ == "__main__":
    main()
