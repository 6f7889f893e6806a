"""Where finished shards leave their statistics until the reducer merges them.

Keyed by (job, side, shard): a shard that runs twice overwrites its own entry and never adds twice.
The farm cannot put them in Redis whole: one shard's XᵀX is 2048² float64 = 32 MiB (16 as the packed
triangle stored), and a thousand of those would make Redis' memory unpredictable. So the shard's
`FeatureStats` encoding and its feature rows go to the feature store as files, streamed and hashed in one
pass, and Redis holds a small record per shard with their SHA-256 digests. (A shard knows before it starts
that its rows are kept, so it streams them to their file while it runs: `spool_rows`; and it reserves its
statistics' file, whose pages are written while it runs: `reserve_stats`.) A reducer that finds
the record missing (Redis restarted or flushed), a file missing, or a digest that differs gets None, and the
shard is recomputed instead of guessed. The embedded runner writes the same files to a private directory and keeps
the records in memory (`LocalPartials`), so its memory, too, does not grow with the number of shards.

A shard of a job with several extractors leaves one `FeatureStats` per extractor, all in one record, so
that they are written, replaced and lost together.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Protocol

from evalfarm.errors import JobError
from evalfarm.keys import INCEPTION
from evalfarm.metrics import FeatureStats
from evalfarm.scheduler.row_files import NpyFileRows
from evalfarm.scheduler.row_spool import RowSpool
from evalfarm.scheduler.store import FeatureStore, HashingWriter, Reserved

if TYPE_CHECKING:
    import redis

PARTIAL_TTL_S = 7 * 24 * 3600  #: partials of an abandoned job expire; a finished job deletes its own
FETCH_BLOCK = 8 << 20  #: bytes read per request when a remote store's rows file is copied to local disk


class PartialStore(Protocol):
    """The seam between a shard and the reducer. Implementations must make `put` an overwrite."""

    def spool_rows(self, job_id: str, side: str, shard: int, extractor: str, n: int, dim: int) -> RowSpool | None:
        """A file to write the shard's rows of `extractor` into while it runs, handed back to `put` (or
        aborted); None when this store keeps rows in the statistics instead."""

    def reserve_stats(self, job_id: str, side: str, shard: int, extractor: str, nbytes: int) -> Reserved | None:
        """The file of the shard's statistics of `extractor`, reserved while it runs (`store.Reserved`) and
        handed back to `put` (or aborted); None when this store keeps no files."""

    def put(self, job_id: str, side: str, shard: int, parts: Mapping[str, FeatureStats],
            rows: Mapping[str, RowSpool] | None = None, reserved: Mapping[str, Reserved] | None = None) -> None:
        """Record a finished shard's statistics per extractor, with its feature rows when kept: in the
        statistics, or in `rows`, the spools of this shard, which `put` closes. `reserved` are the statistics'
        reserved files, which `put` writes."""

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


class LocalPartials:
    """Records in this process: the embedded runner's (shards' files in `store`, a private directory), and
    the state machine's unit tests' (without a store: the statistics objects themselves, in memory)."""

    def __init__(self, store: FeatureStore | None = None) -> None:
        self.store = store
        self._items: dict[tuple[str, str, int], dict[str, FeatureStats]] = {}
        self._records: dict[tuple[str, str, int], dict[str, str | int]] = {}
        self._blobs: dict[tuple[str, str], bytes] = {}
        self._digests: dict[tuple[str, str], str] = {}
        self._leases: dict[tuple[str, str], float] = {}
        self._attempts: dict[tuple[str, str], int] = {}

    def spool_rows(self, job_id: str, side: str, shard: int, extractor: str, n: int, dim: int) -> RowSpool | None:
        return None if self.store is None else spool_shard_rows(self.store, job_id, side, shard, extractor, n, dim)

    def reserve_stats(self, job_id: str, side: str, shard: int, extractor: str, nbytes: int) -> Reserved | None:
        return None if self.store is None else reserve_shard_stats(self.store, job_id, side, shard, extractor, nbytes)

    def put(self, job_id: str, side: str, shard: int, parts: Mapping[str, FeatureStats],
            rows: Mapping[str, RowSpool] | None = None, reserved: Mapping[str, Reserved] | None = None) -> None:
        if self.store is None:
            if rows or reserved:
                raise ValueError("files spooled or reserved in a partial store that keeps no files")
            self._items[(job_id, side, shard)] = dict(parts)
        else:
            self._records[(job_id, side, shard)] = write_shard_files(self.store, job_id, side, shard, parts, rows,
                                                                     reserved)

    def get(self, job_id: str, side: str, shard: int, *, features: bool,
            extractor: str = INCEPTION) -> FeatureStats | None:
        if self.store is None:
            return self._items.get((job_id, side, shard), {}).get(extractor)
        record = self._records.get((job_id, side, shard), {})
        return read_shard_files(self.store, record, job_id, side, shard, extractor=extractor, features=features)

    def discard(self, job_id: str, side: str, shard: int) -> None:
        self._items.pop((job_id, side, shard), None)
        record = self._records.pop((job_id, side, shard), None)
        if self.store is not None:
            delete_shard_files(self.store, job_id, side, shard, record or {})

    def job_ids(self) -> set[str]:
        return {k[0] for k in self._items} | {k[0] for k in self._records} | {k[0] for k in self._digests}

    def drop(self, job_id: str) -> None:
        for store in (self._items, self._records, self._blobs, self._digests, self._leases, self._attempts):
            for key in [k for k in store if k[0] == job_id]:
                del store[key]
        if self.store is not None:
            self.store.delete_prefix(f"jobs/{job_id}")

    def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        if self.store is None:
            self._blobs[(job_id, name)] = data
            self._digests[(job_id, name)] = _digest(data)
        else:
            self._digests[(job_id, name)] = write_blob(self.store, job_id, name, data)

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        """Checked against its digest as the farm's store checks it: bytes altered after `put` count as lost."""
        digest = self._digests.get((job_id, name))
        if self.store is not None:
            return read_blob(self.store, job_id, name, digest)
        data = self._blobs.get((job_id, name))
        return data if data is not None and _digest(data) == digest else None

    def blob_names(self, job_id: str) -> set[str]:
        return {n for j, n in (self._digests if self.store is not None else self._blobs) if j == job_id}

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


# -- a shard's files: the one format of the farm and the embedded runner --------------------------------------------


def _file(job_id: str, side: str, shard: int, what: str) -> str:
    return f"jobs/{job_id}/{side}/{shard:06d}.{what}"


def _what(extractor: str, what: str) -> str:
    """Inception's files keep the names they had before there were other extractors."""
    return what if extractor == INCEPTION else f"{extractor}.{what}"


def _blob_file(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/blobs/{name}"


def write_blob(store: FeatureStore, job_id: str, name: str, data: bytes) -> str:
    """Store a reducer's intermediate result; returns its digest, for the record."""
    store.put_bytes(_blob_file(job_id, name), data)
    return _digest(data)


def read_blob(store: FeatureStore, job_id: str, name: str, digest: str | None) -> bytes | None:
    """The blob recorded with `digest`, or None when it was never recorded, is missing or differs."""
    if digest is None:
        return None
    try:
        data = store.get_bytes(_blob_file(job_id, name))
    except FileNotFoundError:
        return None
    return data if _digest(data) == digest else None


def _write_hashed(opened: contextlib.AbstractContextManager[IO[bytes]], write: Callable[[HashingWriter], None]) -> str:
    with opened as f:
        hashed = HashingWriter(f, threaded=True)
        try:
            write(hashed)
        finally:
            hashed.close()
    return hashed.hexdigest()


def spool_shard_rows(store: FeatureStore, job_id: str, side: str, shard: int, extractor: str,
                     n: int, dim: int) -> RowSpool:
    """The shard's rows file of `extractor`, written while the shard runs (see `row_spool`)."""
    return RowSpool(store, _file(job_id, side, shard, _what(extractor, "features.npy")), n, dim)


def reserve_shard_stats(store: FeatureStore, job_id: str, side: str, shard: int, extractor: str,
                        nbytes: int) -> Reserved:
    """The shard's statistics file of `extractor`, reserved while the shard runs (see `store.Reserved`)."""
    return store.reserve(_file(job_id, side, shard, _what(extractor, "stats.npz")), nbytes)


def write_shard_files(store: FeatureStore, job_id: str, side: str, shard: int, parts: Mapping[str, FeatureStats],
                      rows: Mapping[str, RowSpool] | None = None,
                      reserved: Mapping[str, Reserved] | None = None) -> dict[str, str | int]:
    """Write a shard's statistics (and rows, when kept) per extractor; returns the record of their digests.
    Rows spooled while the shard ran (`rows`, closed here) are taken as they are; the spool and the
    statistics must agree on the number of rows. Statistics with a `reserved` file are written into it."""
    rows, reserved = rows or {}, reserved or {}
    for extractor, held in reserved.items():
        if extractor not in parts or held.key != _file(job_id, side, shard, _what(extractor, "stats.npz")):
            raise ValueError(f"{held.key} is not the statistics file of shard {side}/{shard} of job {job_id}")
    record: dict[str, str | int] = {}
    for extractor, spool in rows.items():
        stats = parts.get(extractor)
        if stats is None or stats.keep_features or spool.n != stats.row_count:
            raise ValueError(f"rows spooled for {extractor} do not belong to the statistics given")
        if spool.key != _file(job_id, side, shard, _what(extractor, "features.npy")):
            raise ValueError(f"{spool.key} is not the rows file of shard {side}/{shard} of job {job_id}")
        record[_what(extractor, "features.npy")] = spool.close()
    for extractor, stats in parts.items():
        what = _what(extractor, "stats.npz")
        opened = reserved[extractor].writer() if extractor in reserved else store.writer(_file(job_id, side, shard, what))
        record[what] = _write_hashed(opened, lambda out, stats=stats: stats.write(out, features=False))
        if stats.keep_features:
            what = _what(extractor, "features.npy")
            record[what] = _write_hashed(store.writer(_file(job_id, side, shard, what)), stats.write_rows)
        record["n"] = stats.n
    return record


def read_shard_files(store: FeatureStore, record: Mapping[str, str | int], job_id: str, side: str, shard: int,
                     *, extractor: str, features: bool) -> FeatureStats | None:
    """One extractor's statistics as `record` describes them, or None when a file is missing or differs."""
    wanted = [_what(extractor, "stats.npz"), *([_what(extractor, "features.npy")] if features else [])]
    if any(what not in record for what in wanted):
        return None
    try:
        data = store.get_bytes(_file(job_id, side, shard, wanted[0]))
        if _digest(data) != record[wanted[0]]:
            return None
        stats = FeatureStats.from_bytes(data)
        if features:
            rows = _rows(store, _file(job_id, side, shard, wanted[1]), str(record[wanted[1]]))
            if rows is None:
                return None
            stats.attach_features(rows)
    except FileNotFoundError:
        return None
    return stats


def _rows(store: FeatureStore, key: str, digest: str) -> NpyFileRows | None:
    """A shard's feature rows, verified and left on disk, mapped: KID reads the rows it draws, so a side of a
    million samples is never in memory. A remote store's file is first copied to a local one (`_fetched`)."""
    path = store.local_path(key)
    if path is None:
        return _fetched(store, key, digest)
    try:
        rows = NpyFileRows(path)
    except ValueError:
        return None  # not the rows it claims to be: recomputed, as an altered file is
    return rows if rows.file_sha256() == digest else None


def _fetched(store: FeatureStore, key: str, digest: str) -> NpyFileRows | None:
    """A remote shard's rows streamed into an unnamed local temporary file (under TMPDIR) and hashed on the
    way, then mapped as a local file is: the reducer's memory stays flat whatever the store, and the file
    is gone with its mapping."""
    h = hashlib.sha256()
    with tempfile.TemporaryFile(prefix="evalfarm-rows-") as local:
        with store.reader(key) as remote:
            while block := remote.read(FETCH_BLOCK):
                h.update(block)
                try:
                    local.write(block)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise JobError(
                        f"no room on local disk for a copy of {store.describe(key)} ({exc.strerror}): the reducer "
                        f"copies each shard's rows from a remote store to TMPDIR ({tempfile.gettempdir()}); point "
                        "TMPDIR at a disk with room for 8 GiB per million samples") from exc
        if h.hexdigest() != digest:
            return None
        local.flush()
        try:
            rows = NpyFileRows(local)  # the mapping outlives the file object
        except ValueError:
            return None
    rows.path = store.describe(key)  # for messages: the file it stands for, not a descriptor
    return rows


def delete_shard_files(store: FeatureStore, job_id: str, side: str, shard: int,
                       record: Mapping[str, str | int]) -> None:
    """The files `record` names, and any other file of the shard (rows spooled before its record was made)."""
    folder = f"jobs/{job_id}/{side}"
    named = {f"{shard:06d}.{what}" for what in ("stats.npz", "features.npy", *(k for k in record if k != "n"))}
    for name in named | {c for c in store.children(folder) if c.startswith(f"{shard:06d}.")}:
        store.delete(f"{folder}/{name}")


class RedisPartials:
    """Statistics and feature rows in the feature store, their digests in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, store: FeatureStore, ttl_s: int = PARTIAL_TTL_S) -> None:
        self.redis, self.store, self.ttl_s = client, store, ttl_s

    @staticmethod
    def _key(job_id: str, side: str, shard: int) -> str:
        return f"evalfarm:partial:{job_id}:{side}:{shard}"

    def spool_rows(self, job_id: str, side: str, shard: int, extractor: str, n: int, dim: int) -> RowSpool:
        return spool_shard_rows(self.store, job_id, side, shard, extractor, n, dim)

    def reserve_stats(self, job_id: str, side: str, shard: int, extractor: str, nbytes: int) -> Reserved:
        return reserve_shard_stats(self.store, job_id, side, shard, extractor, nbytes)

    def put(self, job_id: str, side: str, shard: int, parts: Mapping[str, FeatureStats],
            rows: Mapping[str, RowSpool] | None = None, reserved: Mapping[str, Reserved] | None = None) -> None:
        record = write_shard_files(self.store, job_id, side, shard, parts, rows, reserved)
        key = self._key(job_id, side, shard)
        with self.redis.pipeline() as p:  # overwrite, never add: a shard that ran twice leaves one record
            p.delete(key)
            p.hset(key, mapping=record)
            p.expire(key, self.ttl_s)
            p.execute()

    def get(self, job_id: str, side: str, shard: int, *, features: bool,
            extractor: str = INCEPTION) -> FeatureStats | None:
        record = {k.decode(): v.decode() for k, v in self.redis.hgetall(self._key(job_id, side, shard)).items()}
        return read_shard_files(self.store, record, job_id, side, shard, extractor=extractor, features=features)

    def job_ids(self) -> set[str]:
        in_redis = {k.decode().split(":")[2] for k in self.redis.scan_iter(match="evalfarm:partial:*", count=500)}
        return in_redis | set(self.store.children("jobs"))

    def discard(self, job_id: str, side: str, shard: int) -> None:
        key = self._key(job_id, side, shard)
        record = {k.decode(): "" for k in self.redis.hkeys(key)}
        self.redis.delete(key)
        delete_shard_files(self.store, job_id, side, shard, record)

    def drop(self, job_id: str) -> None:
        for key in self.redis.scan_iter(match=f"evalfarm:partial:{job_id}:*", count=500):
            self.redis.delete(key)
        self.store.delete_prefix(f"jobs/{job_id}")

    # Blobs: bytes in the feature store, their digests in one Redis hash per job; leases and attempt counts
    # beside them. All under the job's `evalfarm:partial:` prefix, so `drop` and the janitor remove them too.

    def _blobs(self, job_id: str) -> str:
        return f"evalfarm:partial:{job_id}:blobs"

    def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        digest = write_blob(self.store, job_id, name, data)
        with self.redis.pipeline() as p:
            p.hset(self._blobs(job_id), name, digest)
            p.expire(self._blobs(job_id), self.ttl_s)
            p.execute()

    def get_blob(self, job_id: str, name: str) -> bytes | None:
        digest = self.redis.hget(self._blobs(job_id), name)
        return read_blob(self.store, job_id, name, digest.decode() if digest is not None else None)

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
