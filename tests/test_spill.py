"""The embedded runner's spill directories: each run's is removed when it ends, and a killed run's by the next."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from evalfarm.scheduler.spill import spill_directory, sweep


def test_a_spill_directory_is_removed_when_its_run_ends(tmp_path: Path) -> None:
    with spill_directory(tmp_path) as spill:
        (Path(spill) / "partial.npz").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


def test_a_live_run_s_directory_is_not_swept(tmp_path: Path) -> None:
    with spill_directory(tmp_path) as spill:
        assert sweep(tmp_path) == []
        assert Path(spill).is_dir()


def test_a_killed_run_s_directory_is_removed_by_the_next_run(tmp_path: Path) -> None:
    killed = subprocess.run(  # a run that dies inside its block, as SIGKILL would leave it: no cleanup ran
        [sys.executable, "-c", "import os, sys; from pathlib import Path; "
         "from evalfarm.scheduler.spill import spill_directory\n"
         f"with spill_directory(Path({str(tmp_path)!r})) as d:\n"
         "    Path(d, 'partial.npz').write_bytes(b'x'); print(d, flush=True); os._exit(9)"],
        capture_output=True, text=True, check=False)
    left = Path(killed.stdout.strip())
    assert killed.returncode == 9 and left.is_dir()
    with spill_directory(tmp_path) as spill:
        assert not left.exists()
        assert [p.name for p in tmp_path.iterdir()] == [Path(spill).name]


def test_a_sweep_passes_over_what_is_not_a_run_s_directory(tmp_path: Path) -> None:
    with spill_directory(tmp_path) as spill:
        stray = tmp_path / (Path(spill).name[:-3] + "txt")  # this host's prefix, but a file
        stray.write_text("not a directory")
        assert sweep(tmp_path) == []
        assert stray.exists()
