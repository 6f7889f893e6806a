"""evalfarm benchmark: featurization vs torch-fidelity/pytorch-fid, reducer math, memory, farm overhead.

    .venv/bin/python bench/run.py                 # full default sizes, CPU
    .venv/bin/python bench/run.py --quick         # small sizes (minutes on 2 cores)
    .venv/bin/python bench/run.py --device cuda   # adds bf16/fp16 figures
    .venv/bin/python bench/run.py --sections reducer,memory
    .venv/bin/python bench/run.py --sections scale  # the farm's own cost, 50k to 1M samples, on a stand-in network

Prints one `name: value unit` line per figure, then a summary of the targets as PASS/MISS. Targets are
printed, never asserted: this is a measurement, not a test. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SYNTHETIC_CAVEAT,
    Report,
    fmt,
    machine_lines,
    section_header,
    synthetic_weights,
    temp_dir,
)

SECTIONS = ("featurize", "reducer", "memory", "farm", "api", "scale")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, for development and CI-sized machines")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--n-png", type=int, help="size of the 32x32 PNG set (default 256, --quick 32)")
    p.add_argument("--n-jpeg", type=int, help="size of the 256x256 JPEG set (default 128, --quick 16)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


# ---------------------------------------------------------------------------------------------- summary

TARGETS = (
    # (label, figure, comparison, threshold, what the figure is)
    ("featurization >= 1.25x torch-fidelity", "featurize.both.ratio_evalfarm_over_torch_fidelity", ">=", 1.25, "x"),
    ("farm 1 worker <= 1.10x embedded", "farm.w1.ratio_over_embedded", "<=", 1.10, "x"),
    ("FID eigen >= 10x faster than sqrtm", "reducer.fid.speedup_eigen_over_sqrtm", ">=", 10.0, "x"),
    ("worker RSS flat in N (max/min <= 1.10)", "memory.worker.rss_max_over_min", "<=", 1.10, "x"),
    ("reducer RSS flat in N (max/min <= 1.10)", "memory.reducer.evalfarm.rss_max_over_min", "<=", 1.10, "x"),
    ("farm overhead per shard <= 50 ms (median, 1M, 1 worker)", "scale.1m.s5000.w1.overhead_ms_per_shard_median",
     "<=", 50.0, "ms"),
    ("farm overhead per shard <= 50 ms (median, 1M, 4 workers on the 2 cores)",
     "scale.1m.s5000.w4.overhead_ms_per_shard_median", "<=", 50.0, "ms"),
    (">= 20 shards/s with 4 workers (stand-in)", "scale.50k.s1000.w4.shards_per_s", ">=", 20.0, "shards/s"),
    (">= 20 shards/s with 4 workers (stand-in narrowed to 16 features: coordination alone)",
     "scale.coord.50k.s1000.w4.shards_per_s", ">=", 20.0, "shards/s"),
    ("reducer 1M (IS+FID+KID) <= 60 s", "scale.1m.s5000.w4.reducer_s", "<=", 60.0, "s"),
    ("reducer peak RSS 1M <= 1.5 GB", "scale.1m.s5000.w4.reducer_peak_rss_mib", "<=", 1430.0, "MiB"),
    ("planning 1M samples <= 5 s", "scale.plan_s_1m", "<=", 5.0, "s"),
)


def summary(report: Report) -> None:
    section_header("summary (targets are printed, never asserted)")
    for label, name, op, threshold, unit in TARGETS:
        value = report.get(name)
        if value is None:
            print(f"{label}: n/a (not measured in this run)")
            continue
        ok = value >= threshold if op == ">=" else value <= threshold
        print(f"{label}: {'PASS' if ok else 'MISS'} ({fmt(value)} {unit}; {name})")
    parity = report.figures.get("metrics.parity_fid_is_mean")
    if parity is not None:
        print(f"evalfarm == torch-fidelity (FID, IS mean within 1e-4): {parity.value} {parity.unit}")
    print(f"\nNOTE: {SYNTHETIC_CAVEAT}")


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda was asked for, but torch sees no CUDA device here", file=sys.stderr)
            return 2
    os.environ.setdefault("EVALFARM_ALLOW_DOWNLOAD", "0")
    report = Report()
    print("evalfarm benchmark " + ("(--quick) " if args.quick else "") + f"device={args.device} "
          f"sections={','.join(args.sections)}")
    for line in machine_lines(args.device):
        print(line)
    print(f"NOTE: {SYNTHETIC_CAVEAT}")
    weights = synthetic_weights(seed=0)
    t0 = time.perf_counter()
    with temp_dir("evalfarm-bench-") as root:
        workload, scale_figures = None, {}
        if "featurize" in args.sections:
            import featurize

            workload = featurize.run(report, root=root, weights=weights, device=args.device, quick=args.quick,
                                     n_png=args.n_png, n_jpeg=args.n_jpeg)
        if "reducer" in args.sections:
            import reducer

            reducer.run(report, quick=args.quick)
        if "memory" in args.sections:
            import memory

            memory.run(report, root=root, weights=weights, device=args.device, quick=args.quick)
        if "farm" in args.sections:
            import farm

            farm.run(report, root=root, weights=weights, quick=args.quick, workload=workload)
        if "api" in args.sections:
            import api

            api.run(report, root=root, weights=weights, quick=args.quick)
        if "scale" in args.sections:
            import scale

            scale_figures = scale.run(report, root=root, quick=args.quick)
    summary(report)
    print(f"total benchmark wall time: {time.perf_counter() - t0:.1f} s")
    if "scale" in args.sections:
        print(json.dumps({"scale": scale_figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
