"""`evalfarm watch`: each complete sample set of a training run evaluated exactly once, across restarts.

The end-to-end tests run the watcher as a real process (`evalfarm watch`), kill it with SIGKILL mid-work
and start it again, as a training cluster's preemption would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

import evalfarm
from evalfarm.db import Job, JobState, session_factory
from evalfarm.errors import EvalfarmError
from evalfarm.settings import get_settings
from evalfarm.watch.sets import discover, parse_step, step_parser
from evalfarm.watch.state import StateLock, WatchState
from evalfarm.watch.watcher import ABANDONED, Backend, Watcher, WatchOptions

from .helpers import EVALFARM, rel_err, wait_until, write_images

CONFIG = ["--kid-subset-size", "6", "--kid-subsets", "4", "--splits", "2", "--quiet"]


# -- which sets, which steps, when complete ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "step"), [("samples_120000.npz", 120000), ("step-120000", 120000),
                                            ("ckpt_v2_step_5000.tar.gz", 5000), ("step-1000-ema0.9999", 1000),
                                            ("samples_split3_1000", None), ("final", None)])
def test_the_step_follows_a_step_word_or_is_the_only_number(name, step):
    assert parse_step(name, step_parser(None)) == step


def test_a_name_with_several_numbers_and_no_step_word_has_no_step_rather_than_a_guess():
    assert parse_step("samples_120000_64x64.npz", step_parser(None)) is None


def test_a_step_regex_takes_its_first_group():
    assert parse_step("run3-it00042-ema", step_parser(r"it(\d+)")) == 42


def test_a_bad_step_regex_is_a_clear_error():
    with pytest.raises(EvalfarmError, match="--step-regex"):
        step_parser("it(")


def test_only_sample_sets_matching_the_pattern_are_candidates(tmp_path):
    for name in ("samples_1000.npz", "samples_2000.npz.tmp", "samples_3000.npz.DONE", ".hidden_4000.npz",
                 "log_5000.txt", "other_6000.npz"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "samples_7000").mkdir()
    (tmp_path / "samples_final.npz").write_bytes(b"x")
    found, skipped = discover(tmp_path, "samples_*", step_parser(None))
    assert [(s.name, s.step) for s in found] == [("samples_1000.npz", 1000), ("samples_7000", 7000)]
    assert list(skipped) == ["samples_final.npz"]


def test_sets_that_share_a_step_are_all_left_out_naming_each_other(tmp_path):
    for name in ("samples_1000.npz", "samples_1000_ema.npz", "samples_2000.npz"):
        (tmp_path / name).write_bytes(b"x")
    found, skipped = discover(tmp_path, "*", step_parser(None))
    assert [s.name for s in found] == ["samples_2000.npz"]
    assert set(skipped) == {"samples_1000.npz", "samples_1000_ema.npz"}
    assert "samples_1000.npz, samples_1000_ema.npz" in skipped["samples_1000.npz"]


def test_a_done_marker_beside_a_file_or_inside_a_folder_completes_it(tmp_path):
    (tmp_path / "a_1.npz").write_bytes(b"x")
    (tmp_path / "a_1.npz.DONE").touch()
    (tmp_path / "b_2").mkdir()
    (tmp_path / "b_2" / "DONE").touch()
    (tmp_path / "c_3.npz").write_bytes(b"x")
    found, _ = discover(tmp_path, "*", step_parser(None))
    assert {s.name: s.done_marker() for s in found} == {"a_1.npz": True, "b_2": True, "c_3.npz": False}


def test_a_growing_set_changes_its_signature(tmp_path):
    folder = tmp_path / "step-1"
    folder.mkdir()
    (folder / "0.png").write_bytes(b"x" * 10)
    (s,) = discover(tmp_path, "*", step_parser(None))[0]
    before = s.signature()
    (folder / "1.png").write_bytes(b"x" * 10)
    assert s.signature() != before


def test_a_second_watcher_on_the_same_state_refuses_to_start(tmp_path):
    with StateLock(tmp_path / "state.json"), pytest.raises(EvalfarmError, match="another watcher"):
        with StateLock(tmp_path / "state.json"):
            pass


def test_a_state_file_of_another_run_is_refused(tmp_path):
    WatchState(tmp_path / "state.json", "run-a").save()
    with pytest.raises(EvalfarmError, match="belongs to run 'run-a'"):
        WatchState.load(tmp_path / "state.json", "run-b")


def test_a_damaged_state_file_is_a_clear_error(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(EvalfarmError, match="unreadable"):
        WatchState.load(tmp_path / "state.json", "run-a")


class Recorder(Backend):
    """Records which sets the watcher starts: the decision logic alone, without evaluating anything."""

    embedded = True

    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self, s, key, opts, on_job):
        self.started.append(s.name)
        return {"job_id": f"job-{s.name}"}


def test_a_set_still_growing_is_started_only_once_it_stops_changing(tmp_path):
    folder = tmp_path / "step-1"
    folder.mkdir()
    watcher = Watcher(WatchOptions(root=tmp_path, run="r", ref=None, every_s=0), backend := Recorder(),
                      log=lambda _: None)
    for i in range(3):  # a writer adding a file between every two polls
        (folder / f"{i}.png").write_bytes(b"x" * (i + 1))
        watcher.poll()
    assert backend.started == []
    watcher.poll()  # unchanged since the last poll
    assert backend.started == ["step-1"]
    watcher.poll()
    assert backend.started == ["step-1"]  # once


def test_a_restarted_watcher_waits_a_poll_interval_before_it_trusts_the_last_signature(tmp_path):
    folder = tmp_path / "step-1"
    folder.mkdir()
    (folder / "0.png").write_bytes(b"x")
    opts = WatchOptions(root=tmp_path, run="r", ref=None, every_s=60)
    Watcher(opts, Recorder(), log=lambda _: None).poll()
    restarted = Watcher(opts, backend := Recorder(), log=lambda _: None)
    restarted.poll()  # a moment later: the writer may be between two files
    assert backend.started == []
    restarted.state.seen_at -= 61
    restarted.poll()
    assert backend.started == ["step-1"]


# -- end to end: a real watcher process, killed and restarted -------------------------------------------------------


class WatchProcess:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen([*EVALFARM, "watch", *args], stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=dict(os.environ))

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(120)


def state_of(path: Path) -> dict:
    try:
        return json.loads(path.read_text())["sets"]
    except (FileNotFoundError, ValueError):
        return {}


def new_step(root: Path, step: int, n: int, *, done: bool) -> Path:
    """A training job writing the samples of `step`: images first, the DONE marker last."""
    folder = write_images(root / f"step-{step}", n, 32, seed=step, brightness=1.0)
    if done:
        (folder / "DONE").touch()
    return folder


@pytest.fixture
def watched(tmp_path, weights_path, reference_dir, monkeypatch):
    monkeypatch.setenv("EVALFARM_WEIGHTS", str(weights_path))
    root = tmp_path / "samples"
    root.mkdir()
    return root


def test_three_steps_over_a_kill_and_a_restart_give_three_results_and_no_duplicate(watched, reference_dir, tmp_path):
    state = watched / ".evalfarm-watch-run7.json"
    args = [str(watched), "--run", "run7", "--ref", str(reference_dir), "--every", "0.5", *CONFIG]
    log = tmp_path / "watch.log"
    first = WatchProcess(args, log)
    try:
        new_step(watched, 1000, 8, done=True)
        wait_until(lambda: state_of(state).get("step-1000", {}).get("state") == "succeeded", 180, "step 1000")
        new_step(watched, 2000, 48, done=False)  # no marker: complete once it stops changing
        wait_until(lambda: state_of(state).get("step-2000", {}).get("job_id"), 60, "step 2000 started")
    finally:
        first.kill()  # mid-evaluation of step 2000
    abandoned = state_of(state)["step-2000"]
    assert abandoned["state"] == "submitted"
    new_step(watched, 3000, 8, done=True)  # written while no watcher runs

    second = WatchProcess(args, log)
    try:
        wait_until(lambda: all(state_of(state).get(f"step-{s}", {}).get("state") == "succeeded"
                               for s in (1000, 2000, 3000)), 300, "all three steps")
    finally:
        assert second.stop() == 0

    with session_factory(get_settings().db_url)() as s:
        jobs = s.scalars(select(Job).where(Job.run == "run7")).all()
    succeeded = sorted(j.step for j in jobs if j.state == JobState.SUCCEEDED)
    assert succeeded == [1000, 2000, 3000]
    (dead,) = [j for j in jobs if j.state != JobState.SUCCEEDED]
    assert (dead.id, dead.state, dead.error) == (abandoned["job_id"], JobState.FAILED, ABANDONED)

    final = next(j for j in jobs if j.step == 3000)
    expected = evalfarm.evaluate(str(watched / "step-3000"), str(reference_dir), kid_subset_size=6, kid_subsets=4,
                                 splits=2, cache=False)
    for key in expected["metric_keys"]:
        assert rel_err(final.result[key], expected[key]) <= 1e-6, key


def test_once_evaluates_what_is_there_and_exits(watched, reference_dir, tmp_path):
    new_step(watched, 10, 8, done=False)
    done = subprocess.run([*EVALFARM, "watch", str(watched), "--run", "r", "--ref", str(reference_dir), "--once",
                           "--every", "0.5", *CONFIG], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 10: step-10 is complete (unchanged since the last poll)" in done.stderr
    assert state_of(watched / ".evalfarm-watch-r.json")["step-10"]["state"] == "succeeded"

    again = subprocess.run([*EVALFARM, "watch", str(watched), "--run", "r", "--ref", str(reference_dir), "--once",
                            "--every", "0.5", *CONFIG], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "is complete" not in again.stderr  # already evaluated: nothing to do


def test_a_watcher_that_lost_its_state_adopts_what_was_evaluated_and_exports_to_a_new_target(watched, reference_dir,
                                                                                               tmp_path):
    new_step(watched, 10, 8, done=True)
    args = [*EVALFARM, "watch", str(watched), "--run", "r", "--ref", str(reference_dir), "--once", "--every", "0.5",
            *CONFIG]
    assert subprocess.run(args, capture_output=True, text=True, timeout=300).returncode == 0
    (watched / ".evalfarm-watch-r.json").unlink()
    logdir = tmp_path / "tb"
    again = subprocess.run([*args, "--export", f"tensorboard:{logdir}"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "step-10 was evaluated already" in again.stderr
    with session_factory(get_settings().db_url)() as s:
        (job,) = s.scalars(select(Job).where(Job.run == "r")).all()  # one job: nothing evaluated twice
    assert tensorboard_fid(logdir) == [(10, pytest.approx(job.result["frechet_inception_distance"], rel=1e-6))]


def test_a_problem_of_the_watch_itself_stops_it_and_marks_no_set_failed(watched, reference_dir, tmp_path):
    new_step(watched, 10, 8, done=True)
    done = subprocess.run([*EVALFARM, "watch", str(watched), "--run", "r", "--ref", str(reference_dir), "--once",
                           "--weights", tmp_path / "missing.pth", *CONFIG], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "missing.pth" in done.stderr
    assert "Traceback" not in done.stderr
    assert state_of(watched / ".evalfarm-watch-r.json") == {}  # fixed and started again, it evaluates the set


def test_a_set_that_cannot_be_read_fails_once_and_the_watch_goes_on(watched, reference_dir):
    (watched / "samples_5.npz").write_bytes(b"not an npz")
    (watched / "samples_5.npz.DONE").touch()
    new_step(watched, 6, 8, done=True)
    done = subprocess.run([*EVALFARM, "watch", str(watched), "--run", "r", "--ref", str(reference_dir), "--once",
                           "--every", "0.5", *CONFIG], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1  # a set failed
    sets = state_of(watched / ".evalfarm-watch-r.json")
    assert sets["samples_5.npz"]["state"] == "failed" and "samples_5.npz" in sets["samples_5.npz"]["error"]
    assert sets["step-6"]["state"] == "succeeded"
    assert "Traceback" not in done.stderr

    again = subprocess.run([*EVALFARM, "watch", str(watched), "--run", "r", "--ref", str(reference_dir), "--once",
                            "--every", "0.5", *CONFIG], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0  # the exit status tells of this watch's failures, not of earlier ones


def tensorboard_fid(logdir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("evalfarm/frechet_inception_distance")]


def test_a_watch_with_export_writes_each_result_at_its_step(watched, reference_dir, tmp_path):
    new_step(watched, 20, 8, done=True)
    logdir = tmp_path / "tb"
    done = subprocess.run([*EVALFARM, "watch", str(watched), "--run", "r", "--ref", str(reference_dir), "--once",
                           "--every", "0.5", "--export", f"tensorboard:{logdir}", *CONFIG],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with session_factory(get_settings().db_url)() as s:
        (job,) = s.scalars(select(Job).where(Job.run == "r")).all()
    assert tensorboard_fid(logdir) == [(20, pytest.approx(job.result["frechet_inception_distance"], rel=1e-6))]


def test_eval_with_export_writes_its_run_after_the_result(reference_dir, weights_path, tmp_path):
    samples = new_step(tmp_path, 30, 8, done=False)
    logdir = tmp_path / "tb"
    done = subprocess.run([*EVALFARM, "eval", str(samples), "--ref", str(reference_dir), "--weights", weights_path,
                           "--run", "e", "--step", "30", "--json", tmp_path / "r.json", "--export",
                           f"tensorboard:{logdir}", *CONFIG], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fid = json.loads((tmp_path / "r.json").read_text())["frechet_inception_distance"]
    assert tensorboard_fid(logdir) == [(30, pytest.approx(fid, rel=1e-6))]


def test_export_without_a_run_is_refused_before_any_work(reference_dir, tmp_path):
    done = subprocess.run([*EVALFARM, "eval", str(tmp_path / "nothing-here"), "--ref", str(reference_dir),
                           "--export", f"tensorboard:{tmp_path}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "give the run (--run)" in done.stderr


def test_a_reference_that_cannot_be_read_stops_the_watch_before_any_set_fails(watched, tmp_path):
    new_step(watched, 10, 8, done=True)
    done = subprocess.run([*EVALFARM, "watch", str(watched), "--run", "r", "--ref", tmp_path / "no-such-ref",
                           "--once", *CONFIG], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "--ref" in done.stderr and "no-such-ref" in done.stderr and "Traceback" not in done.stderr
    assert state_of(watched / ".evalfarm-watch-r.json") == {}


def test_a_directory_that_does_not_exist_is_refused_not_created(tmp_path):
    done = subprocess.run([*EVALFARM, "watch", str(tmp_path / "typo"), "--run", "r", "--metrics", "is", "--once"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not (tmp_path / "typo").exists()
