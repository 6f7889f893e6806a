"""A shard's statistics file reserved while the shard runs (`store.Reserved`): its pages are written (zeros)
before the statistics exist, and the statistics then written over them are what the key holds, whole, and
nothing is left when the shard fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evalfarm.keys import INCEPTION
from evalfarm.metrics import FeatureStats
from evalfarm.metrics.stats import encoded_size
from evalfarm.scheduler.partials import read_shard_files, reserve_shard_stats, write_shard_files
from evalfarm.scheduler.plan import SAMPLES
from evalfarm.scheduler.store import FeatureStore

KEY = "jobs/j/samples/000000.stats.npz"


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("size", [10, 3 << 20])  # shorter than the reservation, and longer
def test_the_key_holds_exactly_what_was_written_over_the_reservation(tmp_path: Path, size: int) -> None:
    store = FeatureStore(str(tmp_path))
    data = np.random.default_rng(0).bytes(size)
    reserved = store.reserve(KEY, 1 << 20)
    assert not store.exists(KEY)
    with reserved.writer() as f:
        f.write(data)
        assert not store.exists(KEY)  # nothing under the key before it is whole
    assert store.get_bytes(KEY) == data
    assert files_under(tmp_path) == [KEY]  # no temporary file left


def test_an_aborted_reservation_leaves_nothing(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path))
    store.reserve(KEY, 8 << 20).abort()
    assert files_under(tmp_path) == []


def test_a_write_that_fails_over_a_reservation_leaves_nothing_and_abort_then_does_nothing(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path))
    reserved = store.reserve(KEY, 1 << 20)
    with pytest.raises(RuntimeError), reserved.writer() as f:
        f.write(b"half")
        raise RuntimeError("the encoder failed")
    reserved.abort()
    assert files_under(tmp_path) == []


def test_a_remote_store_reserves_nothing_and_writes_as_it_always_does(tmp_path: Path) -> None:
    store = FeatureStore(f"memory://reserved-{tmp_path.name}")
    reserved = store.reserve(KEY, 1 << 20)
    with reserved.writer() as f:
        f.write(b"statistics")
    reserved.abort()
    assert store.get_bytes(KEY) == b"statistics"


def test_statistics_written_over_their_reserved_file_read_back_equal(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path))
    stats = FeatureStats.of(np.random.default_rng(1).standard_normal((40, 64)).astype(np.float32),
                            keep_features=False)
    reserved = reserve_shard_stats(store, "j", SAMPLES, 0, INCEPTION, encoded_size(64))
    record = write_shard_files(store, "j", SAMPLES, 0, {INCEPTION: stats}, reserved={INCEPTION: reserved})
    back = read_shard_files(store, record, "j", SAMPLES, 0, extractor=INCEPTION, features=False)
    assert back is not None and back.digest() == stats.digest()
    assert files_under(tmp_path) == [KEY]


def test_a_reserved_file_of_another_shard_is_refused(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path))
    stats = FeatureStats.of(np.ones((3, 4), np.float32), keep_features=False)
    reserved = reserve_shard_stats(store, "j", SAMPLES, 1, INCEPTION, 64)
    with pytest.raises(ValueError, match="not the statistics file of shard samples/0"):
        write_shard_files(store, "j", SAMPLES, 0, {INCEPTION: stats}, reserved={INCEPTION: reserved})
    reserved.abort()
