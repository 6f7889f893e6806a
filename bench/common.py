"""Shared helpers of the benchmark sections: figures, timers, memory readings, seeded inputs, weights.

Every figure goes through `Report.figure`, which prints it at once as `name: value unit` (so a long run
shows progress and a killed run keeps what it measured) and keeps it for the summary at the end.
"""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"  # git-ignored
VENV_BIN = REPO_ROOT / ".venv" / "bin"

#: FLOPs of one FID-InceptionV3 forward pass at 299x299: 5.7 G multiply-adds, 2 FLOPs each.
FLOPS_PER_IMAGE = 2 * 5.7e9

SYNTHETIC_CAVEAT = (
    "Weights: a seeded synthetic stand-in (evalfarm.models.synthetic) in the canonical FID-InceptionV3 "
    "layout. FID/IS/KID values printed here are NOT real FID values of anything; speed figures are valid "
    "(same architecture, same FLOPs)."
)


# ---------------------------------------------------------------------------------------------- figures


@dataclass
class Figure:
    name: str
    value: float | str | None
    unit: str = ""


@dataclass
class Report:
    """The figures of a run, by name, in the order they were measured."""

    figures: dict[str, Figure] = field(default_factory=dict)

    def figure(self, name: str, value: float | str | None, unit: str = "") -> float | str | None:
        self.figures[name] = Figure(name, value, unit)
        print(f"{name}: {fmt(value)}{(' ' + unit) if unit else ''}", flush=True)
        return value

    def note(self, text: str) -> None:
        """A line that is not a figure (what was skipped, what a figure means)."""
        print(f"  # {text}", flush=True)

    def get(self, name: str) -> float | None:
        f = self.figures.get(name)
        return f.value if f is not None and isinstance(f.value, (int, float)) else None


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}" if abs(value) < 1000 else f"{value:.1f}"
        return f"{value:.3e}"
    return str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / abs(theirs) if theirs != 0 else abs(ours - theirs)


def section_header(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


# ---------------------------------------------------------------------------------------------- timing


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...` then `t[0]` is the wall time in seconds (perf_counter)."""
    box = [0.0]
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t0


def best_of(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of `repeats` calls: on a shared machine the minimum is the least disturbed measurement."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux `clear_refs` 5), so a later reading is the peak of one step."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB: VmHWM, else `ru_maxrss`.

    Not `ru_maxrss` first: Linux keeps it across exec, so a subprocess started from a large parent reports
    the parent's peak (fork copies the high-water mark, exec saves it into the process's rusage). VmHWM is
    the peak of this process's own address space, and `reset_peak_rss` resets it.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mib() -> float:
    """Largest peak RSS among this process's reaped children (DataLoader workers), MiB.

    Forked children count the pages they share with the parent (the network's weights) as their own.
    """
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------- inputs


def smooth_image(rng: np.random.RandomState, size: int, detail: int = 4) -> np.ndarray:
    """A seeded colour field (bicubic-upsampled noise) with some pixel noise: images with real statistics."""
    from PIL import Image

    coarse = (rng.rand(detail, detail, 3) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
    noise = rng.randint(-12, 13, size=img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_image_set(folder: Path, n: int, size: int, fmt_ext: str, seed: int) -> Path:
    """n seeded images of size x size into `folder` as PNG or JPEG (quality 90)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        img = Image.fromarray(smooth_image(rng, size, detail=4 if size <= 64 else 16))
        path = folder / f"{i:05d}.{fmt_ext}"
        if fmt_ext == "png":
            img.save(path)
        else:
            img.save(path, quality=90)
    return folder


def write_npz_set(path: Path, n: int, size: int, seed: int) -> Path:
    rng = np.random.RandomState(seed)
    arr = np.stack([smooth_image(rng, size) for _ in range(n)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=arr)
    return path


# ---------------------------------------------------------------------------------------------- weights


def _synthetic_code_digest() -> str:
    """The cached weights are valid while the code that makes them is unchanged."""
    import evalfarm.models.inception as inception
    import evalfarm.models.synthetic as synthetic

    digest = hashlib.sha256()
    for mod in (synthetic, inception):
        digest.update(Path(mod.__file__).read_bytes())
    return digest.hexdigest()[:12]


def synthetic_weights(seed: int = 0) -> Path:
    """The seeded stand-in weights, made once and cached under bench/out/ (making them takes ~30 s here)."""
    from evalfarm.models.synthetic import write_synthetic_weights

    path = OUT_DIR / "cache" / f"synthetic-inception-seed{seed}-{_synthetic_code_digest()}.pth"
    if not path.is_file():
        print(f"  # writing synthetic weights to {path} (once)", flush=True)
        write_synthetic_weights(path, seed=seed)
    return path


# ---------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines(device: str) -> list[str]:
    import torch

    lines = [
        f"machine: nproc={os.cpu_count()} cpu='{cpu_model()}' python={platform.python_version()} "
        f"torch={torch.__version__} numpy={np.__version__} torch_threads={torch.get_num_threads()}",
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    if device == "cuda" and torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}")
    return lines


def sync_fn(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def matmul_gflops(device: str, size: int, repeats: int = 5) -> float:
    """float32 matmul rate, best of `repeats`: the machine's practical FLOP ceiling for the network."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.float32)
    b = torch.randn(size, size, device=device, dtype=torch.float32)
    (a @ b)  # warm-up: thread pools, cuBLAS handles
    t = best_of(lambda: a @ b, repeats, sync_fn(device))
    return 2 * size**3 / t / 1e9


@contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def python() -> str:
    """The interpreter running the benchmark: subprocesses use the same one (the venv's)."""
    return sys.executable
