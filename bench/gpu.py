"""GPU featurization figures: evalfarm vs torch-fidelity's extractor, fp32 and the opt-in lower precisions.

    python bench/gpu.py [--n 4096] [--batch 256]

Synthetic seeded weights (same architecture and FLOPs as the real file): the speed figures are real,
the FID values are not FID values of anything; only their deviation between precisions matters.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evalfarm.metrics import FeatureStats, frechet_distance  # noqa: E402
from evalfarm.models.extractor import FeatureExtractor  # noqa: E402
from evalfarm.models.synthetic import write_synthetic_weights  # noqa: E402
from evalfarm.models.weights import resolve_weights  # noqa: E402
from evalfarm.pipeline import featurize_range  # noqa: E402
from evalfarm.sources import open_source  # noqa: E402

GMAC_PER_IMAGE = 5.7


def images(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    coarse = torch.from_numpy(rng.rand(n, 3, 8, 8).astype(np.float32) * 255)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 255).to(torch.uint8)


def timed(fn, x: torch.Tensor, batch: int) -> tuple[float, np.ndarray]:
    fn(x[:batch])  # warm-up (cuDNN autotune, allocator)
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = [fn(x[i : i + batch]) for i in range(0, len(x), batch)]
    torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t), np.concatenate(outs)


def fid_halves(f: np.ndarray) -> float:
    h = len(f) // 2
    a, b = FeatureStats.of(f[:h]), FeatureStats.of(f[h:])
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    w = resolve_weights(write_synthetic_weights(f"{tmp}/w.pth"), tmp)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  n={args.n} batch={args.batch}")
    a = torch.randn(8192, 8192, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    torch.cuda.synchronize()
    tflops = 5 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
    ceiling = tflops * 1e12 / (2 * GMAC_PER_IMAGE * 1e9)
    print(f"fp32 matmul: {tflops:.1f} TFLOP/s -> FLOP-bound ceiling {ceiling:.0f} images/s")
    x = images(args.n, 64, 0)
    ref = None
    for precision, fmt in (("fp32", None), ("fp32", torch.channels_last), ("bf16", None), ("fp16", None)):
        ex = FeatureExtractor(w, "cuda", precision)
        if fmt is not None:
            ex.memory_format = fmt
            ex.trunk.to(memory_format=fmt)
            precision += " channels-last"
        ips, feats = timed(ex, x, args.batch)
        fid = fid_halves(feats)
        ref = ref if ref is not None else (fid, feats)
        dev = abs(fid - ref[0]) / abs(ref[0])
        feat_dev = float(np.abs(feats - ref[1]).max() / np.abs(ref[1]).max())
        print(f"evalfarm model {precision}: {ips:.0f} images/s ({100 * ips / ceiling:.0f}% of ceiling); "
              f"FID(halves) {fid:.6f}, rel. deviation vs fp32 {dev:.2e}, max feature deviation {feat_dev:.2e}")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=w.path).cuda()
        ips, feats = timed(lambda b: tf(b.cuda())[0].cpu().numpy(), x, args.batch)
        fid = fid_halves(feats)
        print(f"torch-fidelity model fp32: {ips:.0f} images/s ({100 * ips / ceiling:.0f}% of ceiling); "
              f"FID(halves) {fid:.6f}, rel. diff vs evalfarm fp32 {abs(fid - ref[0]) / abs(ref[0]):.2e}")
    except ImportError as exc:
        print(f"torch-fidelity: not installed ({exc})")
    np.savez(f"{tmp}/x.npz", arr_0=x.permute(0, 2, 3, 1).numpy())
    src = open_source(f"{tmp}/x.npz")
    for precision in ("fp32", "bf16"):
        ex = FeatureExtractor(w, "cuda", precision)
        featurize_range(src, 0, args.batch, ex, batch_size=args.batch)  # warm-up
        t = time.perf_counter()
        out = featurize_range(src, 0, len(src), ex, batch_size=args.batch, num_workers=8)
        print(f"evalfarm pipeline {precision} (npz decode + DataLoader x8 + model + float64 stats): "
              f"{out.n / (time.perf_counter() - t):.0f} images/s")


if __name__ == "__main__":
    main()
