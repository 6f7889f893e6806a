"""Does `torch.compile` pay off for the CPU network after warm-up? Prints eager vs compiled images/s.

    .venv/bin/python bench/compile_probe.py [--batch 32] [--repeats 3]

Runs evalfarm's fused trunk (channels-last, fp32) on one random batch: eager, then compiled with inductor
(weights frozen), and reports the compile time, the steady-state rates and the largest feature difference.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import synthetic_weights

from evalfarm.models.extractor import build_network
from evalfarm.models.fused import FusedTrunk
from evalfarm.models.weights import Weights, file_sha256


def rate(fn, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    best, y = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = fn(x)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    path = synthetic_weights()
    trunk = FusedTrunk(build_network(Weights(path, file_sha256(path)))).to(memory_format=torch.channels_last)
    x = (torch.rand(args.batch, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        trunk(x)
        eager_ips, eager_y = rate(trunk, x, args.repeats)
        compiled = torch.compile(trunk)
        t0 = time.perf_counter()
        compiled(x)
        compile_s = time.perf_counter() - t0
        compiled_ips, compiled_y = rate(compiled, x, args.repeats)
    diff = float((compiled_y - eager_y).abs().max() / eager_y.abs().max())
    print(f"compile.eager.images_per_s: {eager_ips:.2f} images/s")
    print(f"compile.compiled.images_per_s: {compiled_ips:.2f} images/s")
    print(f"compile.speedup: {compiled_ips / eager_ips:.3f} x")
    print(f"compile.first_call_s: {compile_s:.1f} s")
    print(f"compile.break_even_images: {compile_s / max(1e-9, 1 / eager_ips - 1 / compiled_ips):.0f} images")
    print(f"compile.rel_max_feature_diff: {diff:.2e}")


if __name__ == "__main__":
    main()
