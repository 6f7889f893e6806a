"""Every `--extractor` behind one interface: weights by name, a network by name, and which results are publishable.

FID-InceptionV3 (`FeatureExtractor`, with its fused trunk, precisions and IS logits) and torch-fidelity's
other extractors (`extractors.ImageFeatureExtractor`) both take NCHW uint8 batches and return float32
features; a job featurizes each shard once per extractor it names, from one decode.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch

from evalfarm.keys import INCEPTION, is_canonical_inception
from evalfarm.models import extractors
from evalfarm.models.extractor import FeatureExtractor
from evalfarm.models.inception import POOL3_DIM
from evalfarm.models.resize import INPUT_SIZE
from evalfarm.models.weights import Weights, load_weights
from evalfarm.settings import Settings


class Featurizer(Protocol):
    """What a shard needs of a network: its name, width, input size, weights and device, and a call."""

    name: str
    dim: int
    input_size: int
    weights: Weights
    device: torch.device

    def __call__(self, batch: torch.Tensor) -> np.ndarray: ...


def input_size(name: str) -> int:
    return INPUT_SIZE if name == INCEPTION else extractors.get_spec(name).input_size


def load_weights_for(settings: Settings, name: str, path: str | os.PathLike | None = None) -> Weights:
    """`path`, else the extractor's variable (EVALFARM_WEIGHTS for Inception, EVALFARM_WEIGHTS_<NAME> for the
    others), else its canonical file: cached, or downloaded and checked against the published hash."""
    if name == INCEPTION:
        return load_weights(settings, path)
    return extractors.load_extractor_weights(settings, name, path)


def build_featurizer(name: str, weights: Weights, device: str = "auto", precision: str = "fp32") -> Featurizer:
    if name == INCEPTION:
        return FeatureExtractor(weights, device, precision)
    if precision != "fp32":
        raise ValueError(f"--precision {precision} applies to {INCEPTION} only; {name} runs in fp32")
    return extractors.build(name, weights, device)


def feature_dim(name: str) -> int:
    return POOL3_DIM if name == INCEPTION else extractors.get_spec(name).dim


def canonical_weights(name: str, weights_sha256: str | None) -> bool | None:
    """True for the published file, False for another, None where the publisher gives no hash (DINOv2)."""
    if name == INCEPTION:
        return is_canonical_inception(weights_sha256)
    spec = extractors.get_spec(name)
    if spec.sha256 is None:
        return None
    return bool(weights_sha256) and weights_sha256.startswith(spec.sha256)
