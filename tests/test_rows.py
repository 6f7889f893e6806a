"""Feature rows left in the shards' files: KID reads only the rows it draws, and nothing changes a number.

A side's rows are the blocks its shards stored (`metrics.rows.ConcatRows` over `NpyFileRows`); the farm's
partial store hands them out verified and unread, and KID equals, bit for bit, KID on the rows in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from evalfarm.errors import MetricInputError
from evalfarm.metrics import FeatureStats, kernel_inception_distance
from evalfarm.metrics.kid import drawn_rows
from evalfarm.metrics.rows import ConcatRows, RowNotKept, SparseRows, rows_in
from evalfarm.scheduler.partials import LocalPartials, PartialStore, RedisPartials
from evalfarm.scheduler.plan import SAMPLES
from evalfarm.scheduler.row_files import NpyFileRows
from evalfarm.scheduler.store import FeatureStore

from .farm import REDIS_URL, require_services

DIM = 16
SIZES = (7, 1, 12, 5)  #: shard sizes, uneven on purpose


def shard_rows(seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, DIM)).astype(np.float32) for n in SIZES]


def write_npy(path: Path, rows: np.ndarray) -> Path:
    np.save(path, rows, allow_pickle=False)
    return path


@pytest.fixture
def blocks(tmp_path: Path) -> tuple[list[np.ndarray], ConcatRows]:
    """The shards' rows in memory, and the same rows as files (every other one) and arrays, concatenated."""
    parts = shard_rows()
    stored = [NpyFileRows(write_npy(tmp_path / f"{i}.npy", p)) if i % 2 == 0 else p for i, p in enumerate(parts)]
    return parts, ConcatRows(stored, DIM)


def test_rows_at_gives_the_rows_of_the_whole_array_in_the_order_asked(blocks) -> None:
    parts, rows = blocks
    whole = np.concatenate(parts)
    index = np.random.default_rng(0).permutation(len(whole))[:17]
    assert rows.rows_at(index).tobytes() == whole[index].tobytes()
    assert rows.slice(5, 21).tobytes() == whole[5:21].tobytes()
    assert len(rows) == len(whole) == sum(SIZES)


def test_a_row_index_out_of_range_is_refused(blocks) -> None:
    _, rows = blocks
    with pytest.raises(IndexError):
        rows.rows_at(np.array([sum(SIZES)]))


def test_kid_on_rows_left_in_files_equals_kid_in_memory_bit_for_bit(blocks) -> None:
    parts, rows = blocks
    whole = np.concatenate(parts)
    other = np.random.default_rng(9).standard_normal((20, DIM)).astype(np.float32) + 0.3
    args = dict(subsets=7, subset_size=6, seed=2020)
    assert kernel_inception_distance(rows, other, **args) == kernel_inception_distance(whole, other, **args)


def test_merged_statistics_keep_the_shards_files_as_their_rows(blocks, tmp_path: Path) -> None:
    parts, _ = blocks
    stats = []
    for i, p in enumerate(parts):
        s = FeatureStats.of(p, keep_features=False)
        s.attach_features(NpyFileRows(write_npy(tmp_path / f"shard-{i}.npy", p)))
        stats.append(s)
    merged = stats[0] + stats[1] + stats[2] + stats[3]
    assert isinstance(merged.rows, ConcatRows)
    assert all(isinstance(b, NpyFileRows) for b in merged.rows.blocks)  # nothing was read to merge
    assert merged.features.tobytes() == np.concatenate(parts).tobytes()  # and all of them, when asked for


def test_computing_kid_leaves_both_sides_rows_in_their_files(tmp_path: Path) -> None:
    """The reducer's metrics read the rows KID draws; neither side is assembled in memory on the way."""
    from evalfarm.config import EvalConfig
    from evalfarm.pipeline.reduce import compute_metrics

    def side(name: str, seed: int) -> FeatureStats:
        parts = []
        for i, rows in enumerate(shard_rows(seed)):
            s = FeatureStats.of(rows, keep_features=False)
            s.attach_features(NpyFileRows(write_npy(tmp_path / f"{name}-{i}.npy", rows)))
            parts.append(s)
        return parts[0] + parts[1] + parts[2] + parts[3]

    samples, reference = side("samples", 3), side("reference", 4)
    config = EvalConfig(metrics=("kid",), kid_subsets=3, kid_subset_size=5)
    compute_metrics(config, samples, reference)
    assert isinstance(samples.rows, ConcatRows) and isinstance(reference.rows, ConcatRows)


def test_a_file_that_is_not_float32_rows_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float32"):
        NpyFileRows(write_npy(tmp_path / "ints.npy", np.zeros((3, 4), np.int64)))


# -- the partial stores: the farm's (records in Redis) and the embedded runner's (records in this process) ---------


@pytest.fixture(params=["redis", "local"])
def partials(request: pytest.FixtureRequest, tmp_path: Path):
    files = FeatureStore(str(tmp_path / "store"))
    if request.param == "redis":
        require_services()
        store = RedisPartials(redis.Redis.from_url(REDIS_URL), files)
    else:
        store = LocalPartials(files)
    yield store, tmp_path / "store"
    store.drop("rows-job")


def test_dropping_a_job_removes_its_files(partials) -> None:
    store, root = partials
    put_shard(store, shard_rows()[2])
    assert list((root / "jobs" / "rows-job").rglob("*.npy"))
    store.drop("rows-job")
    assert not (root / "jobs" / "rows-job").exists()
    assert store.get("rows-job", SAMPLES, 0, features=False) is None


def put_shard(store: PartialStore, rows: np.ndarray) -> None:
    store.put("rows-job", SAMPLES, 0, {"inception-v3-compat": FeatureStats.of(rows)})


def test_a_stored_shard_hands_out_its_rows_verified_and_unread(partials) -> None:
    store, _ = partials
    rows = shard_rows()[2]
    put_shard(store, rows)
    got = store.get("rows-job", SAMPLES, 0, features=True)
    assert isinstance(got.rows, NpyFileRows)
    assert got.features.tobytes() == rows.tobytes()


@pytest.mark.parametrize("damage", ["altered", "truncated", "header"])
def test_a_damaged_rows_file_makes_the_shard_lost_not_read(partials, damage: str) -> None:
    store, root = partials
    put_shard(store, shard_rows()[2])
    [path] = (root / "jobs" / "rows-job").rglob("*features.npy")
    data = bytearray(path.read_bytes())
    if damage == "altered":
        data[-1] ^= 0x40
    elif damage == "truncated":
        del data[-4:]
    else:  # not a .npy any more
        data[:6] = b"\x00" * 6
    path.write_bytes(bytes(data))
    assert store.get("rows-job", SAMPLES, 0, features=True) is None
    assert store.get("rows-job", SAMPLES, 0, features=False) is not None  # its statistics are intact


def test_a_remote_store_streams_a_shard_in_and_maps_its_rows_from_a_local_copy(tmp_path: Path) -> None:
    store = LocalPartials(FeatureStore(f"memory://rows-{tmp_path.name}"))  # fsspec: nothing to map in place
    rows = shard_rows()[2]
    put_shard(store, rows)
    got = store.get("rows-job", SAMPLES, 0, features=True)
    assert isinstance(got.rows, NpyFileRows)  # on local disk, mapped: a million rows do not fill memory
    assert got.features.tobytes() == rows.tobytes()
    np.testing.assert_array_equal(got.gram, FeatureStats.of(rows).gram)
    store.drop("rows-job")


def test_a_damaged_rows_file_in_a_remote_store_makes_the_shard_lost(tmp_path: Path) -> None:
    files = FeatureStore(f"memory://rows-{tmp_path.name}")
    store = LocalPartials(files)
    put_shard(store, shard_rows()[2])
    [path] = [p for p in files.fs.find(files.base) if p.endswith("features.npy")]
    data = bytearray(files.fs.cat_file(path))
    data[-1] ^= 0x40
    files.fs.pipe_file(path, bytes(data))
    assert store.get("rows-job", SAMPLES, 0, features=True) is None
    assert store.get("rows-job", SAMPLES, 0, features=False) is not None
    store.drop("rows-job")


# -- a side that keeps only the rows KID draws -------------------------------------------------------------------


class RecordingRows:
    """Rows that remember every index read, to tell which rows KID reads."""

    def __init__(self, rows: np.ndarray) -> None:
        self.array, self.shape, self.read = rows, rows.shape, set()

    def __len__(self) -> int:
        return len(self.array)

    def rows_at(self, index: np.ndarray) -> np.ndarray:
        self.read.update(int(i) for i in index)
        return self.array[index]

    def slice(self, start: int, stop: int) -> np.ndarray:
        raise AssertionError("KID reads rows by index")


def sparse_stats(rows: np.ndarray, keep: np.ndarray | None, batch: int = 4) -> FeatureStats:
    """Statistics of `rows` accumulated a batch at a time, keeping the rows at `keep` (None: every row)."""
    stats = FeatureStats.new(DIM, row_index=keep)
    for at in range(0, len(rows), batch):
        stats.add(rows[at : at + batch])
    return stats


def test_drawn_rows_are_exactly_the_rows_kid_reads() -> None:
    rng = np.random.default_rng(4)
    one, two = RecordingRows(rng.standard_normal((60, DIM))), RecordingRows(rng.standard_normal((45, DIM)))
    kernel_inception_distance(one, two, subsets=4, subset_size=5, seed=7)
    drawn = drawn_rows(60, 45, subsets=4, subset_size=5, seed=7)
    assert drawn[0].tolist() == sorted(one.read) and drawn[1].tolist() == sorted(two.read)
    assert len(drawn[0]) < 60 and len(drawn[1]) < 45


def test_kid_from_the_drawn_rows_alone_equals_kid_from_every_row_bit_for_bit() -> None:
    rng = np.random.default_rng(5)
    one, two = rng.standard_normal((60, DIM)).astype(np.float32), rng.standard_normal((45, DIM)).astype(np.float32)
    keep_one, keep_two = drawn_rows(60, 45, subsets=4, subset_size=5, seed=7)
    parts = [sparse_stats(one[a:b], keep_one[(keep_one >= a) & (keep_one < b)] - a) for a, b in ((0, 13), (13, 60))]
    merged = parts[0] + parts[1]
    assert merged.row_count == len(keep_one) and merged.n == 60
    sparse = kernel_inception_distance(merged.rows, sparse_stats(two, keep_two).rows, subsets=4, subset_size=5, seed=7)
    assert sparse == kernel_inception_distance(one, two, subsets=4, subset_size=5, seed=7)


def test_a_row_that_was_not_kept_is_refused_not_replaced() -> None:
    rows = SparseRows(np.ones((2, DIM), np.float32), np.array([3, 8]), 10)
    assert len(rows) == 10 and rows.rows_at(np.array([8, 3]))[0].tolist() == [1.0] * DIM
    for index in ([4], [9], [3, 11]):
        with pytest.raises(RowNotKept, match="not kept"):
            rows.rows_at(np.array(index))


def test_statistics_keeping_some_rows_sum_every_row() -> None:
    rows = np.random.default_rng(6).standard_normal((30, DIM)).astype(np.float32)
    sparse, dense = sparse_stats(rows, np.array([0, 5, 6, 29])), sparse_stats(rows, None)
    assert sparse.n == 30 and np.array_equal(sparse.gram, dense.gram) and np.array_equal(sparse.sum, dense.sum)
    assert sparse.rows.rows_at(np.array([29, 5])).tobytes() == rows[[29, 5]].tobytes()
    with pytest.raises(MetricInputError, match="only the rows KID draws"):
        _ = sparse.features


def test_statistics_keeping_some_rows_round_trip_their_positions() -> None:
    rows = np.random.default_rng(7).standard_normal((30, DIM)).astype(np.float32)
    stats = sparse_stats(rows, np.array([2, 17]))
    back = FeatureStats.from_bytes(stats.to_bytes())
    assert back.row_index.tolist() == [2, 17] and back.digest() == stats.digest() != FeatureStats.of(rows).digest()
    assert back.rows.rows_at(np.array([17])).tobytes() == rows[[17]].tobytes()


def test_a_part_that_kept_every_row_merges_with_one_that_kept_some() -> None:
    rows = np.random.default_rng(8).standard_normal((20, DIM)).astype(np.float32)
    merged = FeatureStats.of(rows[:8]) + sparse_stats(rows[8:], np.array([1, 4]))
    assert merged.row_index.tolist() == [*range(8), 9, 12]
    assert merged.rows.rows_at(np.array([12, 3])).tobytes() == rows[[12, 3]].tobytes()


@pytest.mark.parametrize("index", [[3, 3], [5, 2], [-1], [30]])
def test_stored_row_positions_that_are_not_sorted_positions_are_refused(index: list[int]) -> None:
    rows = np.random.default_rng(9).standard_normal((30, DIM)).astype(np.float32)
    stats = sparse_stats(rows, np.array([2, 17]))
    stats.row_index = np.array(index)  # as a damaged or altered file would hold them
    stats._chunks = [rows[: len(index)]]
    with pytest.raises(MetricInputError, match="not sorted positions"):
        FeatureStats.from_bytes(stats.to_bytes())


def test_rows_in_takes_the_positions_from_start_up_to_stop_as_offsets() -> None:
    index = np.array([0, 4, 5, 9, 10])
    assert rows_in(index, 5, 10).tolist() == [0, 4] and rows_in(index, 0, 5).tolist() == [0, 4]
    assert rows_in(index, 10, 11).tolist() == [0] and rows_in(index, 6, 9).tolist() == []
