"""A shard's rows streamed to their file while it runs (`RowSpool`): the same file and digest as writing them
at the end, nothing under the key before it is whole, and nothing at all when the shard fails."""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from evalfarm.metrics import FeatureStats
from evalfarm.scheduler.partials import LocalPartials, write_shard_files
from evalfarm.scheduler.plan import SAMPLES
from evalfarm.scheduler.row_spool import RowSpool
from evalfarm.scheduler.store import FeatureStore, HashingWriter

DIM = 16
KEY = "jobs/j/samples/000000.features.npy"


def batches(n: int = 23, size: int = 5, seed: int = 0) -> list[np.ndarray]:
    rows = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return [rows[i : i + size] for i in range(0, n, size)]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_spooled_rows_are_the_file_write_rows_gives_and_close_returns_its_sha256(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path))
    parts = batches()
    spool = RowSpool(store, KEY, 23, DIM)
    for b in parts:
        spool.write(b)
    digest = spool.close()

    expected = io.BytesIO()
    FeatureStats.of(np.concatenate(parts)).write_rows(expected)
    data = (tmp_path / KEY).read_bytes()
    assert data == expected.getvalue()
    assert digest == hashlib.sha256(data).hexdigest()


def test_rows_copied_when_queued_so_a_reused_buffer_changes_nothing(tmp_path: Path) -> None:
    spool = RowSpool(FeatureStore(str(tmp_path)), KEY, 10, DIM)
    buffer = np.ones((5, DIM), np.float32)
    spool.write(buffer)
    buffer[:] = 2.0  # a featurizer that reuses its output buffer for the next batch
    spool.write(buffer)
    spool.close()
    rows = np.load(tmp_path / KEY)
    assert (rows[:5] == 1.0).all() and (rows[5:] == 2.0).all()


def test_nothing_is_under_the_key_until_the_spool_is_closed(tmp_path: Path) -> None:
    spool = RowSpool(FeatureStore(str(tmp_path)), KEY, 23, DIM)
    for b in batches():
        spool.write(b)
    assert not (tmp_path / KEY).exists()
    spool.close()
    assert (tmp_path / KEY).exists()


def test_an_aborted_spool_leaves_no_file_and_no_temporary(tmp_path: Path) -> None:
    spool = RowSpool(FeatureStore(str(tmp_path)), KEY, 23, DIM)
    spool.write(batches()[0])
    spool.abort()
    assert files_under(tmp_path) == []
    spool.abort()  # twice is harmless: the shard's clean-up may run after an error already aborted it


def test_too_few_rows_is_refused_on_close_and_leaves_nothing(tmp_path: Path) -> None:
    spool = RowSpool(FeatureStore(str(tmp_path)), KEY, 24, DIM)
    for b in batches():
        spool.write(b)
    with pytest.raises(ValueError, match="23 rows written"):
        spool.close()
    assert files_under(tmp_path) == []


def test_more_rows_than_opened_for_are_refused(tmp_path: Path) -> None:
    spool = RowSpool(FeatureStore(str(tmp_path)), KEY, 3, DIM)
    with pytest.raises(ValueError, match="more than the 3 rows"):
        spool.write(batches()[0])
    spool.abort()
    assert files_under(tmp_path) == []


def test_rows_of_another_width_are_refused(tmp_path: Path) -> None:
    spool = RowSpool(FeatureStore(str(tmp_path)), KEY, 5, DIM)
    with pytest.raises(ValueError, match="16 features"):
        spool.write(np.zeros((5, DIM + 1), np.float32))
    spool.abort()


class _FullDisk(FeatureStore):
    """A store whose files fail after `room` bytes, as a full disk does (ENOSPC on write)."""

    def __init__(self, root: str, room: int) -> None:
        super().__init__(root)
        self.room = room

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        with super().writer(key) as f:
            yield _Limited(f, self.room)


class _Limited:
    def __init__(self, out: IO[bytes], room: int) -> None:
        self.out, self.room = out, room

    def write(self, data: object) -> int:
        size = memoryview(data).nbytes  # type: ignore[arg-type]
        if size > self.room:
            raise OSError(28, "No space left on device")
        self.room -= size
        return self.out.write(data)  # type: ignore[arg-type]


def test_a_write_that_fails_in_the_thread_is_raised_to_the_shard_and_leaves_nothing(tmp_path: Path) -> None:
    spool = RowSpool(_FullDisk(str(tmp_path), room=400), KEY, 23, DIM)
    with pytest.raises(OSError, match="No space left"):
        for b in batches():  # the error may surface on a later write or on close, never be lost
            spool.write(b)
        spool.close()
    spool.abort()
    assert files_under(tmp_path) == []


def test_a_shard_record_takes_spooled_rows_and_the_reducer_reads_them(tmp_path: Path) -> None:
    partials = LocalPartials(FeatureStore(str(tmp_path)))
    parts = batches()
    stats, kept = FeatureStats.new(DIM, keep_features=False), FeatureStats.new(DIM)
    spool = partials.spool_rows("j", SAMPLES, 0, "inception-v3-compat", 23, DIM)
    for b in parts:
        spool.write(b)
        stats.add(b)
        kept.add(b)
    partials.put("j", SAMPLES, 0, {"inception-v3-compat": stats}, {"inception-v3-compat": spool})
    got = partials.get("j", SAMPLES, 0, features=True)
    assert got.features.tobytes() == np.concatenate(parts).tobytes()
    assert got.gram.tobytes() == kept.gram.tobytes()  # the statistics of rows kept in memory, bit for bit


def test_spooled_rows_of_another_shard_are_refused(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path))
    spool = RowSpool(store, "jobs/j/samples/000001.features.npy", 5, DIM)
    spool.write(batches()[0])
    stats = FeatureStats.of(batches()[0], keep_features=False)
    with pytest.raises(ValueError, match="not the rows file of shard"):
        write_shard_files(store, "j", SAMPLES, 0, {"inception-v3-compat": stats}, {"inception-v3-compat": spool})
    spool.abort()


class _StuckTemporaries(FeatureStore):
    """A store that cannot remove a temporary file (a remote store whose upload fails on the way out)."""

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        try:
            with super().writer(key) as f:
                yield f
        except BaseException:
            raise OSError(5, "Input/output error") from None


def test_an_abort_that_cannot_clean_up_does_not_replace_the_shard_s_own_error(tmp_path: Path) -> None:
    spool = RowSpool(_StuckTemporaries(str(tmp_path)), KEY, 23, DIM)
    spool.write(batches()[0])
    with pytest.raises(RuntimeError, match="the shard's own"):
        with contextlib.ExitStack() as stack:
            stack.callback(spool.abort)
            raise RuntimeError("the shard's own error")


class _Sink:
    def write(self, data: object) -> int:
        return memoryview(data).nbytes  # type: ignore[arg-type]


def test_a_threaded_hash_gives_the_digest_of_the_bytes_written(tmp_path: Path) -> None:
    blocks = [bytes([i]) * 5000 for i in range(40)]  # more blocks than the queue holds
    hashed = HashingWriter(_Sink(), threaded=True)
    for b in blocks:
        hashed.write(b)
    assert hashed.hexdigest() == hashlib.sha256(b"".join(blocks)).hexdigest()


def test_a_hashing_thread_that_fails_raises_in_the_writer_and_never_blocks_it() -> None:
    hashed = HashingWriter(_Sink(), threaded=True)
    hashed.write(np.arange(10)[::2])  # not contiguous: SHA-256 refuses it, in the hashing thread
    with pytest.raises(ValueError, match="not C-contiguous"):
        for _ in range(100):  # more than the queue holds: a dead hasher would leave the writer blocked here
            hashed.write(b"x" * 5000)
        hashed.hexdigest()
    with pytest.raises(ValueError, match="not C-contiguous"):
        hashed.hexdigest()  # never a digest of part of the bytes
