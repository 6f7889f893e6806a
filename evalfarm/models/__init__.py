"""The FID-InceptionV3 network, its weights and its input preprocessing."""

from evalfarm.models.extractor import FeatureExtractor, resolve_device
from evalfarm.models.inception import NUM_LOGITS, POOL3_DIM, FIDInceptionV3
from evalfarm.models.weights import Weights, load_weights, resolve_weights

__all__ = [
    "FIDInceptionV3",
    "FeatureExtractor",
    "NUM_LOGITS",
    "POOL3_DIM",
    "Weights",
    "load_weights",
    "resolve_device",
    "resolve_weights",
]
