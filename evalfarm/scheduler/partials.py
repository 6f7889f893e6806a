"""Where finished shards leave their statistics until the reducer merges them.

Keyed by (job, side, shard): a shard that runs twice overwrites its own entry and never adds twice.
The embedded runner keeps them in memory. The farm cannot put them in Redis whole: one shard's XᵀX is
2048² float64 = 32 MiB, and a thousand of those would make Redis' memory unpredictable. So the shard's
`FeatureStats` bytes and its feature rows go to the feature store, and Redis holds a small record per
shard with their SHA-256 digests. A reducer that finds the record missing (Redis restarted or flushed),
a file missing, or a digest that differs gets None, and the shard is recomputed instead of guessed.

A shard of a job with several extractors leaves one `FeatureStats` per extractor, all in one record, so
that they are written, replaced and lost together.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import numpy as np

from evalfarm.keys import INCEPTION
from evalfarm.metrics import FeatureStats
from evalfarm.scheduler.row_files import NpyFileRows
from evalfarm.scheduler.store import FeatureStore

if TYPE_CHECKING:
    import redis

PARTIAL_TTL_S = 7 * 24 * 3600  #: partials of an abandoned job expire; a finished job deletes its own


class PartialStore(Protocol):
    """The seam between a shard and the reducer. Implementations must make `put` an overwrite."""

    def put(self, job_id: str, side: str, shard: int, parts: Mapping[str, FeatureStats]) -> None:
        """Record a finished shard's statistics per extractor (with feature rows, when kept)."""

    def get(self, job_id: str, side: str, shard: int, *, features: bool,
            extractor: str = INCEPTION) -> FeatureStats | None:
        """One extractor's stored statistics, or None when they were lost; feature rows only if asked for."""

    def discard(self, job_id: str, side: str, shard: int) -> None:
        """Forget one shard (it finished after its job was cancelled)."""

    def job_ids(self) -> set[str]:
        """Jobs that have anything stored, for the janitor."""

    def drop(self, job_id: str) -> None:
        """Forget every shard of the job (it finished, failed or was cancelled)."""

    # Blobs: the reducer's intermediate results (precision/recall's feature blocks and tiles), by name.

    def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        """Store `data` under `name`, replacing what was there."""

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        """The bytes stored under `name`, or None when they were lost or do not match their digest."""

    def blob_names(self, job_id: str) -> set[str]:
        """The names of the blobs recorded (without reading them)."""

    def lease(self, job_id: str, name: str, ttl_s: float, *, renew: bool = False) -> bool:
        """Take the lease of work `name` for `ttl_s` (True), unless someone holds it; `renew` extends one held."""

    def held(self, job_id: str, name: str) -> bool:
        """Whether someone holds the lease of work `name` now."""

    def release(self, job_id: str, name: str) -> None:
        """End the lease of work `name` (it is done)."""

    def attempt(self, job_id: str, name: str) -> int:
        """Count one more start of work `name`; returns the count."""


class MemoryPartials:
    """In this process, for the embedded runner and the state machine's unit tests."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str, int], dict[str, FeatureStats]] = {}
        self._blobs: dict[tuple[str, str], bytes] = {}
        self._digests: dict[tuple[str, str], str] = {}
        self._leases: dict[tuple[str, str], float] = {}
        self._attempts: dict[tuple[str, str], int] = {}

    def put(self, job_id: str, side: str, shard: int, parts: Mapping[str, FeatureStats]) -> None:
        self._items[(job_id, side, shard)] = dict(parts)

    def get(self, job_id: str, side: str, shard: int, *, features: bool,
            extractor: str = INCEPTION) -> FeatureStats | None:
        return self._items.get((job_id, side, shard), {}).get(extractor)

    def discard(self, job_id: str, side: str, shard: int) -> None:
        self._items.pop((job_id, side, shard), None)

    def job_ids(self) -> set[str]:
        return {k[0] for k in self._items} | {k[0] for k in self._blobs}

    def drop(self, job_id: str) -> None:
        for key in [k for k in self._items if k[0] == job_id]:
            del self._items[key]
        for store in (self._blobs, self._digests, self._leases, self._attempts):
            for key in [k for k in store if k[0] == job_id]:
                del store[key]

    def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        self._blobs[(job_id, name)], self._digests[(job_id, name)] = data, _digest(data)

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        """Checked against its digest as the farm's store checks it: bytes altered after `put` count as lost."""
        data = self._blobs.get((job_id, name))
        return data if data is not None and _digest(data) == self._digests.get((job_id, name)) else None

    def blob_names(self, job_id: str) -> set[str]:
        return {n for j, n in self._blobs if j == job_id}

    def lease(self, job_id: str, name: str, ttl_s: float, *, renew: bool = False) -> bool:
        now = time.monotonic()
        if not renew and self._leases.get((job_id, name), 0.0) > now:
            return False
        self._leases[(job_id, name)] = now + ttl_s
        return True

    def held(self, job_id: str, name: str) -> bool:
        return self._leases.get((job_id, name), 0.0) > time.monotonic()

    def release(self, job_id: str, name: str) -> None:
        self._leases.pop((job_id, name), None)

    def attempt(self, job_id: str, name: str) -> int:
        self._attempts[(job_id, name)] = self._attempts.get((job_id, name), 0) + 1
        return self._attempts[(job_id, name)]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RedisPartials:
    """Statistics and feature rows in the feature store, their digests in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, store: FeatureStore, ttl_s: int = PARTIAL_TTL_S) -> None:
        self.redis, self.store, self.ttl_s = client, store, ttl_s

    @staticmethod
    def _key(job_id: str, side: str, shard: int) -> str:
        return f"evalfarm:partial:{job_id}:{side}:{shard}"

    @staticmethod
    def _file(job_id: str, side: str, shard: int, what: str) -> str:
        return f"jobs/{job_id}/{side}/{shard:06d}.{what}"

    @staticmethod
    def _what(extractor: str, what: str) -> str:
        """Inception's files keep the names they had before there were other extractors."""
        return what if extractor == INCEPTION else f"{extractor}.{what}"

    def put(self, job_id: str, side: str, shard: int, parts: Mapping[str, FeatureStats]) -> None:
        blobs: dict[str, bytes] = {}
        record: dict[str, str | int] = {}
        for extractor, stats in parts.items():
            blobs[self._what(extractor, "stats.npz")] = stats.to_bytes(features=False)
            if stats.keep_features:
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(stats.features), allow_pickle=False)
                blobs[self._what(extractor, "features.npy")] = buf.getvalue()
            record["n"] = stats.n
        for what, data in blobs.items():
            self.store.put_bytes(self._file(job_id, side, shard, what), data)
            record[what] = _digest(data)
        key = self._key(job_id, side, shard)
        with self.redis.pipeline() as p:  # overwrite, never add: a shard that ran twice leaves one record
            p.delete(key)
            p.hset(key, mapping=record)
            p.expire(key, self.ttl_s)
            p.execute()

    def get(self, job_id: str, side: str, shard: int, *, features: bool,
            extractor: str = INCEPTION) -> FeatureStats | None:
        record = {k.decode(): v.decode() for k, v in self.redis.hgetall(self._key(job_id, side, shard)).items()}
        wanted = [self._what(extractor, "stats.npz"), *([self._what(extractor, "features.npy")] if features else [])]
        if any(what not in record for what in wanted):
            return None
        try:
            data = self.store.get_bytes(self._file(job_id, side, shard, wanted[0]))
            if _digest(data) != record[wanted[0]]:
                return None
            stats = FeatureStats.from_bytes(data)
            if features:
                rows = self._rows(self._file(job_id, side, shard, wanted[1]), record[wanted[1]])
                if rows is None:
                    return None
                stats.attach_features(rows)
        except FileNotFoundError:
            return None
        return stats

    def _rows(self, key: str, digest: str) -> np.ndarray | NpyFileRows | None:
        """A shard's feature rows, verified: a local file stays on disk, mapped (KID reads the rows it draws,
        so a side of a million samples is never in memory); a remote one is read whole."""
        path = self.store.local_path(key)
        if path is None:
            data = self.store.get_bytes(key)
            return np.load(io.BytesIO(data), allow_pickle=False) if _digest(data) == digest else None
        try:
            rows = NpyFileRows(path)
        except ValueError:
            return None  # not the rows it claims to be: recomputed, as an altered file is
        return rows if rows.file_sha256() == digest else None

    def job_ids(self) -> set[str]:
        in_redis = {k.decode().split(":")[2] for k in self.redis.scan_iter(match="evalfarm:partial:*", count=500)}
        return in_redis | set(self.store.children("jobs"))

    def discard(self, job_id: str, side: str, shard: int) -> None:
        key = self._key(job_id, side, shard)
        files = [k.decode() for k in self.redis.hkeys(key) if k.decode() != "n"]
        self.redis.delete(key)
        for what in {"stats.npz", "features.npy", *files}:
            self.store.delete(self._file(job_id, side, shard, what))

    def drop(self, job_id: str) -> None:
        for key in self.redis.scan_iter(match=f"evalfarm:partial:{job_id}:*", count=500):
            self.redis.delete(key)
        self.store.delete_prefix(f"jobs/{job_id}")

    # Blobs: bytes in the feature store, their digests in one Redis hash per job; leases and attempt counts
    # beside them. All under the job's `evalfarm:partial:` prefix, so `drop` and the janitor remove them too.

    def _blobs(self, job_id: str) -> str:
        return f"evalfarm:partial:{job_id}:blobs"

    @staticmethod
    def _blob_file(job_id: str, name: str) -> str:
        return f"jobs/{job_id}/blobs/{name}"

    def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        self.store.put_bytes(self._blob_file(job_id, name), data)
        with self.redis.pipeline() as p:
            p.hset(self._blobs(job_id), name, _digest(data))
            p.expire(self._blobs(job_id), self.ttl_s)
            p.execute()

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        digest = self.redis.hget(self._blobs(job_id), name)
        if digest is None:
            return None
        try:
            data = self.store.get_bytes(self._blob_file(job_id, name))
        except FileNotFoundError:
            return None
        return data if _digest(data) == digest.decode() else None

    def blob_names(self, job_id: str) -> set[str]:
        return {k.decode() for k in self.redis.hkeys(self._blobs(job_id))}

    def lease(self, job_id: str, name: str, ttl_s: float, *, renew: bool = False) -> bool:
        key = f"evalfarm:partial:{job_id}:lease:{name}"
        return bool(self.redis.set(key, "1", px=max(1, math.ceil(ttl_s * 1000)), nx=not renew))

    def held(self, job_id: str, name: str) -> bool:
        return bool(self.redis.exists(f"evalfarm:partial:{job_id}:lease:{name}"))

    def release(self, job_id: str, name: str) -> None:
        self.redis.delete(f"evalfarm:partial:{job_id}:lease:{name}")

    def attempt(self, job_id: str, name: str) -> int:
        key = f"evalfarm:partial:{job_id}:attempts"
        with self.redis.pipeline() as p:
            p.hincrby(key, name, 1)
            p.expire(key, self.ttl_s)
            count, _ = p.execute()
        return int(count)
