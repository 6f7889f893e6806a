"""How many decode processes each featurizing process gets: the host's spare cores, shared out; and an array
source, which decodes nothing, gets none (a thread reads it a batch ahead)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evalfarm.keys import INCEPTION
from evalfarm.pipeline.featurize import default_num_workers, featurize_extractors
from evalfarm.settings import Settings
from evalfarm.sources import open_source

from .helpers import images_as_array, write_images


@pytest.mark.parametrize(
    ("cores", "processes", "expected"),
    [
        (2, 1, 1),  # this development machine: one decode process beside the network
        (16, 1, 8),  # capped: more decode processes than that only contend
        (16, 2, 7),  # two GPUs: 14 spare cores, 7 each
        (16, 8, 1),  # eight GPUs on 16 cores: one each, not 8 each (64 processes on 16 cores)
        (4, 8, 1),  # never zero: the network process must not decode on its own
    ],
)
def test_default_num_workers_shares_spare_cores_among_processes(
    monkeypatch: pytest.MonkeyPatch, cores: int, processes: int, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    assert default_num_workers(processes) == expected


def test_loader_workers_setting_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVALFARM_LOADER_WORKERS", "3")
    assert Settings().loader_workers == 3


def test_loader_workers_setting_is_unset_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVALFARM_LOADER_WORKERS", raising=False)
    assert Settings().loader_workers is None


class MeanColour:
    """A featurizer of three features, each image's mean colour: nothing here waits on a network."""

    name, dim, input_size, device = INCEPTION, 3, 16, torch.device("cpu")

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return batch.float().mean(dim=(2, 3)).numpy()


def featurize_watching_children(uri: str, workers: int) -> tuple[np.ndarray, set[int]]:
    """The rows of every image, and the number of child processes seen while the batches came in."""
    seen: set[int] = set()
    stats = featurize_extractors(open_source(uri), 0, 20, [MeanColour()], batch_size=6, num_workers=workers,
                                 on_batch=lambda _: seen.add(len(multiprocessing.active_children())))
    return stats[INCEPTION].features, seen


def test_an_array_source_is_read_without_loader_processes_and_in_order(tmp_path: Path) -> None:
    images = images_as_array(write_images(tmp_path / "png", 20, 16, seed=5, brightness=1.0))
    np.savez(tmp_path / "set.npz", arr_0=images)

    rows, children = featurize_watching_children(str(tmp_path / "set.npz"), workers=2)

    assert children == {0}  # a process per shard cost more to start than the copies it would make
    np.testing.assert_array_equal(rows, images.astype(np.float32).mean(axis=(1, 2)))


def test_a_folder_of_encoded_images_is_decoded_in_loader_processes(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "png", 20, 16, seed=5, brightness=1.0)

    rows, children = featurize_watching_children(str(folder), workers=1)

    assert children == {1}
    np.testing.assert_array_equal(rows, images_as_array(folder).astype(np.float32).mean(axis=(1, 2)))


def test_a_shard_that_fails_mid_range_leaves_no_reading_thread_behind(tmp_path: Path) -> None:
    np.savez(tmp_path / "set.npz", arr_0=images_as_array(write_images(tmp_path / "png", 20, 16, seed=5,
                                                                      brightness=1.0)))

    def fail(_: int) -> None:
        raise RuntimeError("the network failed")

    with pytest.raises(RuntimeError, match="network failed"):
        featurize_extractors(open_source(str(tmp_path / "set.npz")), 0, 20, [MeanColour()], batch_size=6,
                             on_batch=fail)
    deadline = time.monotonic() + 5
    while any(t.name.startswith("evalfarm-read") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the batch read ahead may still be finishing
    assert not any(t.name.startswith("evalfarm-read") for t in threading.enumerate())


def test_a_fortran_ordered_array_is_read_by_loader_processes(tmp_path: Path) -> None:
    images = images_as_array(write_images(tmp_path / "png", 20, 16, seed=5, brightness=1.0))
    np.save(tmp_path / "set.npy", np.asfortranarray(images))

    rows, children = featurize_watching_children(str(tmp_path / "set.npy"), workers=1)

    assert children == {1}  # strided: not a plain copy of a byte range
    np.testing.assert_array_equal(rows, images.astype(np.float32).mean(axis=(1, 2)))
