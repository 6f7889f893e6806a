"""Seeded stand-in weights in the canonical layout, for tests and benchmarks where the real file is absent.

Random convolutions with BatchNorm statistics calibrated on seeded images keep every layer's activations
well scaled, so features and logits behave like a trained network's in magnitude. Numbers computed with
these weights exercise the arithmetic only: they are NOT FID/IS/KID values of anything.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from evalfarm.models.inception import FIDInceptionV3
from evalfarm.models.resize import INPUT_SIZE, normalize

LOGIT_STD = 3.0  #: spread of the calibrated logits, so the Inception Score is far from its floor of 1


def calibration_images(n: int, seed: int) -> torch.Tensor:
    """Smooth seeded colour fields in [0, 255], NCHW at the network's input size."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g) * 255
    return nn.functional.interpolate(coarse, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic").clamp(0, 255)


@torch.no_grad()
def make_synthetic_weights(seed: int = 0, n_calibration: int = 16) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: running stats become the calibration batch's stats
            m.bias.uniform_(0.0, 0.2, generator=torch.Generator().manual_seed(seed + m.num_features))
    net.train()
    x = normalize(calibration_images(n_calibration, seed))
    pool3, logits = net(x)
    net.fc.weight.mul_(LOGIT_STD / logits.std())
    state = net.state_dict()
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def write_synthetic_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the weights atomically (concurrent test workers may race to create the same file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="tmp-weights-", suffix=".pth")
    os.close(fd)
    torch.save(make_synthetic_weights(seed), tmp)
    os.replace(tmp, path)
    return path
