"""A tar's member index: what listing a tar costs a process, and what opening it from the planner's index costs.

A tar has no directory: `TarSource` reads every member's header to list it. The planner does that once and
keeps the listing in the feature store under the tar's content hash; a shard's worker opens the tar from it.
Each figure is taken in a fresh process, on a plain tar of N tiny PNGs (a pool of 1000 distinct images,
repeated: listing does not depend on the content).

    python bench/tar_index.py --n 200000 1000000
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parent / "out"


def write_tar(n: int) -> Path:
    path = OUT / f"tar-index-{n}.tar"
    if path.exists():
        return path
    from PIL import Image

    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(1000):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        pool.append(buf.getvalue())
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(n):
            data = pool[i % len(pool)]
            info = tarfile.TarInfo(f"samples/{i:07d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)
    return path


def child(what: str, tar: str, store: str) -> dict:
    from evalfarm.config import EvalConfig
    from evalfarm.scheduler.plan import index_key, plan_samples
    from evalfarm.scheduler.store import FeatureStore
    from evalfarm.sources import SampleRoots, open_source

    files = FeatureStore(store)
    t0 = time.perf_counter()
    if what == "plan":  # list, hash, keep the index
        plan = plan_samples(tar, EvalConfig(shard_size=5000), SampleRoots.unrestricted(), files)
        return {"seconds": time.perf_counter() - t0, "n": plan.n, "content_hash": plan.content_hash}
    if what == "list":  # a worker without the index
        source = open_source(tar)
        return {"seconds": time.perf_counter() - t0, "n": len(source)}
    content_hash = what.split(":", 1)[1]  # a worker with it
    index = files.get_bytes(index_key(content_hash))
    source = open_source(tar, index=index)
    return {"seconds": time.perf_counter() - t0, "n": len(source), "index_mib": len(index) / 2**20}


def run_child(what: str, tar: Path, store: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "child", what, str(tar), store], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        print(json.dumps(child(*sys.argv[2:5])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[200_000])
    args = parser.parse_args()
    figures = {}
    for n in args.n:
        tar = write_tar(n)
        with tempfile.TemporaryDirectory() as store:
            plan = run_child("plan", tar, store)
            listed = run_child("list", tar, store)
            indexed = run_child(f"index:{plan['content_hash']}", tar, store)
        assert plan["n"] == listed["n"] == indexed["n"] == n
        label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m"
        print(f"tar {label} ({tar.stat().st_size / 2**20:.0f} MiB): plan (list + content hash + keep index) "
              f"{plan['seconds']:.2f} s; a worker listing it {listed['seconds']:.2f} s; a worker opening it from the "
              f"index {indexed['seconds']:.2f} s (index {indexed['index_mib']:.1f} MiB)")
        figures.update({f"tar_plan_s_{label}": plan["seconds"], f"tar_list_s_{label}": listed["seconds"],
                        f"tar_open_from_index_s_{label}": indexed["seconds"]})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
