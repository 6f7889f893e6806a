"""Shard partials in the farm: small sums in Redis, large arrays in the feature store.

One FID partial's XᵀX is 2048² float64 = 32 MiB; a thousand shards of that in Redis would make its memory
unpredictable. So Redis holds, per (job, side, shard), n, Σx, the IS split sums and the digests of the
shard's Gram and features files, which live in the feature store. A reducer that finds a Redis record
missing (Redis restarted) or a file whose digest differs recomputes that shard instead of guessing.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import redis

from evalfarm.metrics import FeatureStats, SplitStats
from evalfarm.pipeline import ShardOutput
from evalfarm.store import FeatureStore

PARTIAL_TTL_S = 7 * 24 * 3600  #: partials of an abandoned job expire; a finished job deletes its own


def _key(job_id: str, side: str, shard: int) -> str:
    return f"evalfarm:partial:{job_id}:{side}:{shard}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RedisPartials:
    def __init__(self, client: redis.Redis, store: FeatureStore, ttl_s: int = PARTIAL_TTL_S) -> None:
        self.redis, self.store, self.ttl_s = client, store, ttl_s

    def _file(self, job_id: str, side: str, shard: int, what: str) -> str:
        return f"jobs/{job_id}/{side}/{shard:06d}.{what}.npy"

    def put(self, job_id: str, side: str, shard: int, output: ShardOutput) -> None:
        blobs = {}
        for what, array in (("gram", output.feature_stats.gram), ("features", output.features)):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
            blobs[what] = buf.getvalue()
            self.store.put_bytes(self._file(job_id, side, shard, what), blobs[what])
        record = {
            "n": output.feature_stats.n,
            "sum": output.feature_stats.sum.astype(np.float64).tobytes(),
            "gram_sha256": _digest(blobs["gram"]),
            "features_sha256": _digest(blobs["features"]),
            "seconds": output.seconds,
        }
        if output.split_stats is not None:
            record["split"] = output.split_stats.to_bytes()
        key = _key(job_id, side, shard)
        with self.redis.pipeline() as p:  # overwrite, never add: a shard that ran twice leaves one record
            p.delete(key)
            p.hset(key, mapping=record)
            p.expire(key, self.ttl_s)
            p.execute()

    def get(self, job_id: str, side: str, shard: int, *, features: bool) -> ShardOutput | None:
        rec = self.redis.hgetall(_key(job_id, side, shard))
        if not rec:
            return None
        try:
            gram_bytes = self.store.get_bytes(self._file(job_id, side, shard, "gram"))
            feat_bytes = self.store.get_bytes(self._file(job_id, side, shard, "features")) if features else None
        except FileNotFoundError:
            return None
        if _digest(gram_bytes) != rec[b"gram_sha256"].decode():
            return None
        if feat_bytes is not None and _digest(feat_bytes) != rec[b"features_sha256"].decode():
            return None
        n = int(rec[b"n"])
        fs = FeatureStats(n, np.frombuffer(rec[b"sum"], np.float64).copy(), np.load(io.BytesIO(gram_bytes)))
        feats = np.load(io.BytesIO(feat_bytes)) if feat_bytes is not None else np.empty((0, fs.sum.shape[0]), np.float32)
        split = SplitStats.from_bytes(rec[b"split"]) if b"split" in rec else None
        return ShardOutput(feats, fs, split, float(rec[b"seconds"]))

    def drop(self, job_id: str) -> None:
        for key in self.redis.scan_iter(match=f"evalfarm:partial:{job_id}:*", count=500):
            self.redis.delete(key)
        self.store.delete_prefix(f"jobs/{job_id}")
