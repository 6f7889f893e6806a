"""Cached reference statistics are checked on every read: a damaged file is never used, and names itself."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from evalfarm.metrics import FeatureStats
from evalfarm.scheduler.references import CorruptCache, load_reference, store_reference
from evalfarm.scheduler.row_files import NpyFileRows, npz_member
from evalfarm.scheduler.store import FeatureStore

KEY, WEIGHTS, RESIZE = "refs/example.npz", "w" * 64, "tf"


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(str(tmp_path / "store"))


def cached(store: FeatureStore) -> FeatureStats:
    stats = FeatureStats.of(np.abs(np.random.RandomState(0).normal(size=(6, 4))).astype(np.float32))
    store_reference(store, KEY, stats, content_hash="c" * 64, weights_sha256=WEIGHTS, resize=RESIZE)
    return stats


def test_a_cached_reference_reads_back_equal(store: FeatureStore) -> None:
    stats = cached(store)
    back = load_reference(store, KEY, WEIGHTS, RESIZE, "example")
    np.testing.assert_array_equal(back.gram, stats.gram)
    np.testing.assert_array_equal(back.features, stats.features)


def test_an_altered_cache_file_is_refused_naming_its_path(store: FeatureStore) -> None:
    stats = cached(store)
    stats.sum[0] += 1.0  # valid file, other numbers, the old digest
    stats.meta = dict(stats.meta)
    store.put_bytes(KEY, stats.to_bytes())
    with pytest.raises(CorruptCache, match=r"example.npz are altered"):
        load_reference(store, KEY, WEIGHTS, RESIZE, "example")


def test_a_truncated_cache_file_is_refused_naming_its_path(store: FeatureStore) -> None:
    cached(store)
    data = store.get_bytes(KEY)
    store.put_bytes(KEY, data[: len(data) // 2])
    with pytest.raises(CorruptCache, match=r"example.npz are unreadable \(BadZipFile\)"):
        load_reference(store, KEY, WEIGHTS, RESIZE, "example")


def test_a_cache_file_from_before_digests_is_sealed_on_first_read(store: FeatureStore) -> None:
    stats = FeatureStats.of(np.ones((3, 4), np.float32) + np.eye(3, 4, dtype=np.float32))
    stats.meta = {"content_hash": "c" * 64, "weights_sha256": WEIGHTS, "resize": RESIZE}  # no digest
    store.put_bytes(KEY, stats.to_bytes())

    load_reference(store, KEY, WEIGHTS, RESIZE, "example")

    assert FeatureStats.from_bytes(store.get_bytes(KEY)).meta["sha256"] == stats.digest()


def test_a_cached_reference_leaves_its_rows_in_the_file(store: FeatureStore) -> None:
    stats = cached(store)
    back = load_reference(store, KEY, WEIGHTS, RESIZE, "example")
    assert isinstance(back.rows, NpyFileRows)  # mapped, read a block at a time by the digest check and KID
    assert back.rows.slice(0, len(back.rows)).tobytes() == stats.features.tobytes()


def test_a_cache_file_with_an_altered_row_is_refused(store: FeatureStore) -> None:
    cached(store)
    path = Path(store.local_path(KEY))
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:
        at = npz_member(f, "features.npy")[0] + 128  # inside the rows: past the .npy header
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCache, match=r"example.npz are altered"):
        load_reference(store, KEY, WEIGHTS, RESIZE, "example")


def test_the_digest_of_rows_left_in_files_equals_the_digest_of_rows_in_memory(store: FeatureStore) -> None:
    rows = np.random.RandomState(1).normal(size=(9, 4)).astype(np.float32)
    in_memory = FeatureStats.of(rows)
    from_file = FeatureStats.of(rows)
    store.put_bytes("rows.npy", npy_bytes(rows))
    from_file.attach_features(NpyFileRows(store.local_path("rows.npy")))
    assert from_file.digest() == in_memory.digest()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_a_remote_cache_streams_in_and_reads_back_equal(tmp_path: Path) -> None:
    remote = FeatureStore(f"memory://refs-{tmp_path.name}")
    stats = cached(remote)
    back = load_reference(remote, KEY, WEIGHTS, RESIZE, "example")
    np.testing.assert_array_equal(back.features, stats.features)
    np.testing.assert_array_equal(back.gram, stats.gram)


def test_a_cache_file_whose_rows_member_is_short_is_refused(store: FeatureStore) -> None:
    stats = FeatureStats.of(np.ones((6, 4), np.float32) + np.eye(6, 4, dtype=np.float32))
    rows = npy_bytes(stats.features)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # an older release's file (no digest), its rows cut short
        for name, array in {"n": np.int64(6), "sum": stats.sum, "gram": stats.gram, "weights_sha256": np.str_(WEIGHTS),
                            "resize": np.str_(RESIZE)}.items():
            z.writestr(f"{name}.npy", npy_bytes(array))
        z.writestr("features.npy", rows[:-8])
    store.put_bytes(KEY, buf.getvalue())
    with pytest.raises(CorruptCache, match="unreadable"):
        load_reference(store, KEY, WEIGHTS, RESIZE, "example")


def thinned() -> FeatureStats:
    """Statistics of 6 rows that keep only two of them (as a side whose rows serve KID alone)."""
    stats = FeatureStats.new(4, row_index=np.array([1, 4]))
    stats.add(np.abs(np.random.RandomState(0).normal(size=(6, 4))).astype(np.float32))
    return stats


def test_statistics_that_keep_only_some_rows_are_never_cached(store: FeatureStore) -> None:
    with pytest.raises(ValueError, match="every feature row"):
        store_reference(store, KEY, thinned(), content_hash="c" * 64, weights_sha256=WEIGHTS, resize=RESIZE)
    assert not store.exists(KEY)


def test_a_cache_file_that_keeps_only_some_rows_is_refused(store: FeatureStore) -> None:
    stats = thinned()
    stats.meta = {"content_hash": "c" * 64, "weights_sha256": WEIGHTS, "resize": RESIZE, "sha256": stats.digest()}
    store.put_bytes(KEY, stats.to_bytes())
    with pytest.raises(CorruptCache, match="not a whole reference"):
        load_reference(store, KEY, WEIGHTS, RESIZE, "example")
