"""Reference statistics: the cache keyed by content, named references, and pytorch-fid `mu`/`sigma` files.

A reference is only usable with the weights and resize mode that produced it; using it with others would
compare features from two different networks, so that is refused rather than computed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from evalfarm.errors import ReferenceMismatchError, SourceError
from evalfarm.metrics import FeatureStats
from evalfarm.models import POOL3_DIM
from evalfarm.pipeline.reduce import SideStats
from evalfarm.store import FeatureStore


@dataclass
class StoredReference:
    """Merged statistics and features of a featurized reference set, with what they depend on."""

    feature_stats: FeatureStats
    features: np.ndarray
    content_hash: str
    weights_sha256: str
    resize: str

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            n=np.int64(self.feature_stats.n),
            sum=self.feature_stats.sum,
            gram=self.feature_stats.gram,
            features=self.features,
            content_hash=np.str_(self.content_hash),
            weights_sha256=np.str_(self.weights_sha256),
            resize=np.str_(self.resize),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredReference:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(
                FeatureStats(int(z["n"]), z["sum"], z["gram"]),
                z["features"],
                str(z["content_hash"]),
                str(z["weights_sha256"]),
                str(z["resize"]),
            )

    def side(self) -> SideStats:
        return SideStats.from_partials([self.feature_stats], features=[self.features])

    def check(self, weights_sha256: str, resize: str, what: str) -> None:
        check_compatible(what, self.weights_sha256, self.resize, weights_sha256, resize)


def check_compatible(what: str, ref_weights: str | None, ref_resize: str | None, weights: str, resize: str) -> None:
    if ref_weights and ref_weights != weights:
        raise ReferenceMismatchError(
            f"reference {what} was computed with other Inception weights (sha256 {ref_weights[:12]}…) than this "
            f"job uses ({weights[:12]}…); its features are not comparable. Recreate it with these weights."
        )
    if ref_resize and ref_resize != resize:
        raise ReferenceMismatchError(
            f"reference {what} was computed with --resize {ref_resize}, this job uses --resize {resize}; "
            f"recreate it or run with --resize {ref_resize}."
        )


def load_cached(store: FeatureStore, key: str) -> StoredReference | None:
    return StoredReference.from_bytes(store.get_bytes(key)) if store.exists(key) else None


def is_stats_file(path: str) -> bool:
    """A `.npz` holding `mu` and `sigma` (pytorch-fid's format) rather than images."""
    if not path.endswith(".npz"):
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "mu" in z.files and "sigma" in z.files
    except (OSError, ValueError):
        return False


def load_stats_file(path: str, weights_sha256: str, resize: str) -> SideStats:
    """Read pytorch-fid `mu`/`sigma`; files exported by evalfarm also carry the weights hash and resize."""
    with np.load(path, allow_pickle=False) as z:
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        meta_w = str(z["weights_sha256"]) if "weights_sha256" in z.files else None
        meta_r = str(z["resize"]) if "resize" in z.files else None
        n = int(z["n"]) if "n" in z.files else 0
    if mu.shape != (POOL3_DIM,) or sigma.shape != (POOL3_DIM, POOL3_DIM):
        raise ReferenceMismatchError(
            f"{path} holds statistics of shape mu{mu.shape}, sigma{sigma.shape}; FID-Inception pool3 statistics "
            f"are ({POOL3_DIM},) and ({POOL3_DIM}, {POOL3_DIM})."
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise SourceError(f"{path} holds non-finite statistics.")
    check_compatible(path, meta_w, meta_r, weights_sha256, resize)
    return SideStats(n=n, mu=mu, sigma=sigma)


def export_stats_file(path: str, ref: StoredReference) -> None:
    side = ref.side()
    np.savez(
        path,
        mu=side.mu,
        sigma=side.sigma,
        n=np.int64(side.n),
        weights_sha256=np.str_(ref.weights_sha256),
        resize=np.str_(ref.resize),
    )
