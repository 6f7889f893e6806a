"""Reference statistics: the cache keyed by content, named references, and pytorch-fid `mu`/`sigma` files.

A reference is only usable with the weights and resize mode that produced it; using it with others would
compare features from two different networks, so that is refused rather than computed. Cached
references are `FeatureStats` bytes whose `meta` records what they depend on and the digest of their
arrays, checked on every read: a cache file that fails it is never used, but reported and recomputed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from evalfarm.errors import EvalfarmError, ReferenceMismatchError, SourceError
from evalfarm.keys import INCEPTION
from evalfarm.metrics import FeatureStats
from evalfarm.scheduler.row_files import NpyFileRows, npz_member
from evalfarm.scheduler.store import FeatureStore
from evalfarm.sources import reason

log = logging.getLogger(__name__)


def reference_key(content_hash: str, weights_sha256: str, resize: str) -> str:
    """Cached reference statistics are keyed by what determines them: content, weights and resize mode (the
    weights also tell the extractors apart)."""
    return f"refs/{content_hash[:32]}-{weights_sha256[:16]}-{resize}.npz"


class CorruptCache(EvalfarmError):
    """A cached reference file that is unreadable or does not match its digest (names the file, not its bytes)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"cached reference statistics {path} are {why}; they were not used")
        self.path = path


def store_reference(
    store: FeatureStore, key: str, stats: FeatureStats, *, content_hash: str, weights_sha256: str, resize: str
) -> None:
    """Write atomically, with the digest of the arrays beside what they depend on."""
    if stats.row_index is not None:  # a reference serves any later job's draw: it keeps every row
        raise ValueError("reference statistics must keep every feature row, not only one KID draw's")
    stats.meta = {"content_hash": content_hash, "weights_sha256": weights_sha256, "resize": resize,
                  "sha256": stats.digest()}
    with store.writer(key) as f:  # streamed: a reference's rows are never assembled to be written
        stats.write(f)


def load_reference(store: FeatureStore, key: str, weights_sha256: str, resize: str, what: str) -> FeatureStats | None:
    """The cached statistics at `key`, verified and checked against the job's weights and resize; None when
    absent. CorruptCache when the file cannot be decoded or its arrays do not match their digest."""
    if not store.exists(key):
        return None
    path = store.describe(key)
    try:
        stats = _read(store, key)
    except FileNotFoundError:
        return None
    except Exception as exc:  # truncated, not a zip, wrong keys or dtypes, pickled arrays: never trusted
        raise CorruptCache(path, f"unreadable ({type(exc).__name__})") from exc
    check_compatible(what, stats.meta.get("weights_sha256"), stats.meta.get("resize"), weights_sha256, resize)
    if stats.row_index is not None:
        raise CorruptCache(path, "not a whole reference (they keep only some feature rows)")
    if "sha256" not in stats.meta:  # written before caches carried digests: sealed now, checked from now on
        log.warning("cached reference statistics %s carry no digest (an older evalfarm wrote them); adding one", path)
        try:  # read whole once, so that the zip's own checksums vouch for what is sealed
            stats = FeatureStats.from_bytes(store.get_bytes(key))
        except Exception as exc:
            raise CorruptCache(path, f"unreadable ({type(exc).__name__})") from exc
        store_reference(store, key, stats, content_hash=stats.meta.get("content_hash", ""),
                        weights_sha256=weights_sha256, resize=resize)
    elif stats.meta["sha256"] != stats.digest():
        raise CorruptCache(path, "altered (their arrays do not match the digest stored with them)")
    return stats


def _read(store: FeatureStore, key: str) -> FeatureStats:
    """A local cache file's rows stay in it, mapped (the digest check and KID read them a block at a time);
    a remote one is read whole."""
    local = store.local_path(key)
    if local is None:
        return FeatureStats.from_bytes(store.get_bytes(key))
    with open(local, "rb") as f:  # one open file for the arrays and the rows, whatever replaces the path
        stats = FeatureStats.load(f, features=False)
        member = npz_member(f, "features.npy")
        if member is not None:
            stats.attach_features(NpyFileRows(f, member))
        else:  # no rows, or rows compressed by some other writer: read as numpy reads them
            f.seek(0)
            stats = FeatureStats.load(f)
    return stats


def check_compatible(what: str, ref_weights: str | None, ref_resize: str | None, weights: str, resize: str) -> None:
    if ref_weights and ref_weights != weights:
        raise ReferenceMismatchError(
            f"reference {what} was computed with other weights (sha256 {ref_weights[:12]}…) than this "
            f"job uses ({weights[:12]}…); its features are not comparable. Recreate it with these weights."
        )
    if ref_resize and ref_resize != resize:
        raise ReferenceMismatchError(
            f"reference {what} was computed with --resize {ref_resize}, this job uses --resize {resize}; "
            f"recreate it or run with --resize {ref_resize}."
        )


def is_stats_file(path: str) -> bool:
    """A `.npz` holding `mu` and `sigma` (pytorch-fid's format) rather than images."""
    if not path.endswith(".npz"):
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "mu" in z.files and "sigma" in z.files
    except Exception:  # unreadable as an archive (truncated, not a zip): then it is not a statistics file
        return False


def load_stats_file(path: str, weights_sha256: str, resize: str) -> FeatureStats:
    """Read pytorch-fid `mu`/`sigma`; files written by evalfarm also carry the weights hash and resize.
    Arrays that would need unpickling are refused: a statistics file is numbers, never code."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
            meta_w = str(z["weights_sha256"]) if "weights_sha256" in z.files else None
            meta_r = str(z["resize"]) if "resize" in z.files else None
            n = int(z["n"]) if "n" in z.files else 0
    except Exception as exc:  # object (pickled) arrays, strings where numbers belong, a damaged archive
        raise SourceError(
            f"{path} is not a usable mu/sigma statistics file ({reason(exc)}); it must hold numeric arrays "
            "'mu' (2048,) and 'sigma' (2048, 2048), saved without pickling"
        ) from exc
    from evalfarm.models import POOL3_DIM  # here, not at the top: the API reads references without torch

    if mu.shape != (POOL3_DIM,) or sigma.shape != (POOL3_DIM, POOL3_DIM):
        raise ReferenceMismatchError(
            f"{path} holds statistics of shape mu{mu.shape}, sigma{sigma.shape}; FID-Inception pool3 statistics "
            f"are ({POOL3_DIM},) and ({POOL3_DIM}, {POOL3_DIM})."
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise SourceError(f"{path} holds non-finite statistics.")
    check_compatible(path, meta_w, meta_r, weights_sha256, resize)
    return FeatureStats.from_moments(mu, sigma, n)


@dataclass(frozen=True)
class NamedReference:
    """A registered reference: its statistics sit in the feature store under `store_key`, and, when it was made
    with several extractors, each extractor's under `extractors[name] = (weights_sha256, store_key)`."""

    name: str
    uri: str
    content_hash: str
    weights_sha256: str
    resize: str
    n: int
    store_key: str
    extractors: dict[str, tuple[str, str]] = field(default_factory=dict)

    def stored(self) -> dict[str, tuple[str, str]]:
        """(weights_sha256, store_key) per extractor; a reference registered before there were other
        extractors holds Inception's alone."""
        return self.extractors or {INCEPTION: (self.weights_sha256, self.store_key)}
