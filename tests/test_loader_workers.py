"""How many decode processes each featurizing process gets: the host's spare cores, shared out."""

from __future__ import annotations

import os

import pytest

from evalfarm.pipeline.featurize import default_num_workers
from evalfarm.settings import Settings


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
