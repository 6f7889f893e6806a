"""Resizing to the network's 299x299 input.

`tf`: TensorFlow 1.x `resize_bilinear(align_corners=False)`, the resize of the original TF FID/IS code and of
torch-fidelity (same float32 arithmetic, so it is bit-exact with torch-fidelity on CPU). It aliases when
downsampling, on purpose: that is what published numbers used.
`clean`: PIL bicubic on float32 channels, clean-fid's `clean` mode (antialiased, no re-quantization).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

INPUT_SIZE = 299


def _tf_grid(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = torch.arange(0, n_out, 1, dtype=torch.float32) * scale
    lo = src.long()
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = src - lo.float()
    return lo.to(device), hi.to(device), frac.to(device)


def resize_tf_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize a float NCHW batch like TF1's bilinear resize; identity when already `size`."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    ylo, yhi, dy = _tf_grid(h, size, x.device)
    xlo, xhi, dx = _tf_grid(w, size, x.device)
    dx = dx.to(x.dtype).view(1, 1, 1, size)
    dy = dy.to(x.dtype).view(1, 1, size, 1)
    top, bottom = x.index_select(2, ylo), x.index_select(2, yhi)
    t0, t1 = top.index_select(3, xlo), top.index_select(3, xhi)
    b0, b1 = bottom.index_select(3, xlo), bottom.index_select(3, xhi)
    upper = t0 + (t1 - t0) * dx
    lower = b0 + (b1 - b0) * dx
    return upper + (lower - upper) * dy


def resize_clean_bicubic(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's `clean` resize of one HxWx3 uint8 image to a float32 3xSxS array in [0, 255]."""
    channels = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=0).clip(0, 255).astype(np.float32, copy=False)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 255] to the [-1, 1) range the TF graph was trained on."""
    return (x - 128) / 128
