"""The feature extractor: uint8 images in, (pool3, logits) float32 out, on any device.

Numerics first: TF32 is disabled (cuDNN enables it by default on Ampere and newer, and it moves
features well beyond our parity tolerance); lower precision is opt-in and reported.
"""

from __future__ import annotations

import numpy as np
import torch

from evalfarm.errors import WeightsError
from evalfarm.keys import INCEPTION
from evalfarm.models.fused import FusedTrunk
from evalfarm.models.inception import POOL3_DIM, FIDInceptionV3
from evalfarm.models.resize import INPUT_SIZE, normalize, resize_tf_bilinear
from evalfarm.models.weights import Weights, load_state_dict

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is available")
    return dev


def build_network(weights: Weights) -> FIDInceptionV3:
    net = FIDInceptionV3()
    state = load_state_dict(weights)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise WeightsError(f"{weights.path} is not a FID-InceptionV3 weight file: {exc}") from exc
    if missing or unexpected:
        raise WeightsError(
            f"{weights.path} is not a FID-InceptionV3 weight file "
            f"(missing keys: {missing[:5]}, unexpected keys: {unexpected[:5]})."
        )
    return net.eval().requires_grad_(False)


class FeatureExtractor:
    """Holds the network on one device; call it with NCHW batches (uint8 any size, or float at 299)."""

    name = INCEPTION
    dim = POOL3_DIM
    input_size = INPUT_SIZE

    def __init__(self, weights: Weights, device: str = "auto", precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}")
        self.weights = weights
        self.device = resolve_device(device)
        self.precision = precision
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        net = build_network(weights)
        # Logits are computed here in float64 from pool3 rather than on the device: the device matmul's
        # rounding depends on the batch size, which would make IS depend on how a set was sharded.
        self.fc_weight = net.fc.weight.detach().to(torch.float64).numpy().T.copy()
        # Channels-last speeds up oneDNN convolutions on CPU and tensor-core ones in bf16/fp16 on GPU.
        self.memory_format = (
            torch.channels_last if self.device.type == "cpu" or precision != "fp32" else torch.contiguous_format
        )
        # The same function with BatchNorm folded and shared-input 1x1 convolutions merged (models/fused.py).
        self.trunk = FusedTrunk(net).to(self.device, memory_format=self.memory_format)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """Return float32 pool3 features [N, 2048] as a CPU array."""
        x = batch.to(self.device, non_blocking=True)
        x = x.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_tf_bilinear(x)
        x = normalize(x).contiguous(memory_format=self.memory_format)
        if self.precision == "fp32":
            pool3 = self.trunk(x).mean(dim=(2, 3))
        else:
            with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision]):
                pool3 = self.trunk(x).float().mean(dim=(2, 3))
        return pool3.float().cpu().numpy()

    def logits(self, pool3: np.ndarray) -> np.ndarray:
        """Bias-free 1008-way logits ("logits_unbiased") in float64."""
        return np.asarray(pool3, np.float64) @ self.fc_weight
