"""`evalfarm export`: a run's results written where training teams look (TensorBoard, MLflow, W&B), each at its
training step, equal to the stored values, in step order even when results finished out of order, and never
twice. Results are stored in a real results database, read back with `run_history`, exported with the real
libraries and read back with each library's own reader (W&B offline: its `.wandb` transaction log)."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from evalfarm.errors import EvalfarmError
from evalfarm.export import TARGET_FORMS, Target, export_run, parse_target
from evalfarm.export.wandb import default_run_id
from evalfarm.keys import KEY_FID, KEY_IS_MEAN, KEY_IS_STD, KEY_KID_MEAN, KEY_KID_STD, METRIC_KEYS
from evalfarm.runs import Point, run_history

from .helpers import record_result, run_cli

RUN = "gan-lr2e-4"
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
#: stored out of step order, as a watcher may finish them: (step, finished at)
ARRIVALS = ((3000, T0), (1000, T0 + timedelta(minutes=7)), (2000, T0 + timedelta(minutes=13)))


def value_of(step: int, key: str) -> float:
    """A distinct value per step and key, not representable in float32 (so rounding is visible)."""
    return step / 1000 + METRIC_KEYS.index(key) / 10 + 0.123456789


def store(run: str, step: int | None, finished_at: datetime, values: dict[str, float] | None = None) -> str:
    """A succeeded evaluation of `run` at `step` in this test's results database, one row per metric."""
    values = values if values is not None else {k: value_of(step or 0, k) for k in METRIC_KEYS}
    return record_result(run, step, values, finished_at=finished_at)


@pytest.fixture
def history() -> list[Point]:
    for step, at in ARRIVALS:
        store(RUN, step, at)
    return run_history(RUN)


def add_step_between() -> list[Point]:
    """A fourth result, finished last, for a step between the stored ones; the run's history after it."""
    store(RUN, 1500, T0 + timedelta(minutes=20))
    return run_history(RUN)


def finish_time(step: int) -> datetime:
    return dict(ARRIVALS)[step]


# -- TensorBoard ----------------------------------------------------------------------------------------------


def tb_scalars(logdir: Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, value, wall time) of `tag` in file order, as TensorBoard's own reader gives them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    """A training run's log directory."""
    return tmp_path / "logs"


def f32(x: float) -> float:
    return float(np.float32(x))


def evalfarm_files(logdir: Path) -> list[Path]:
    return sorted(logdir.glob("*.evalfarm"))


def test_tensorboard_holds_every_stored_value_at_its_step_in_step_order(history: list[Point], logdir: Path) -> None:
    assert export_run(RUN, history, f"tensorboard:{logdir}") == 3
    for key in METRIC_KEYS:
        assert tb_scalars(logdir, f"evalfarm/{key}") == [
            (step, f32(value_of(step, key)), finish_time(step).timestamp()) for step in (1000, 2000, 3000)
        ]


def test_tensorboard_export_again_keeps_one_evalfarm_file_with_each_step_once(history: list[Point],
                                                                               logdir: Path) -> None:
    export_run(RUN, history, f"tensorboard:{logdir}")
    export_run(RUN, history, f"tensorboard:{logdir}")
    assert len(evalfarm_files(logdir)) == 1
    assert [s for s, _, _ in tb_scalars(logdir, f"evalfarm/{KEY_FID}")] == [1000, 2000, 3000]


def test_tensorboard_a_step_finished_late_reads_back_sorted(history: list[Point], logdir: Path) -> None:
    export_run(RUN, history, f"tensorboard:{logdir}")
    assert export_run(RUN, add_step_between(), f"tensorboard:{logdir}") == 4
    assert tb_scalars(logdir, f"evalfarm/{KEY_FID}") == [
        (1000, f32(value_of(1000, KEY_FID)), finish_time(1000).timestamp()),
        (1500, f32(value_of(1500, KEY_FID)), (T0 + timedelta(minutes=20)).timestamp()),
        (2000, f32(value_of(2000, KEY_FID)), finish_time(2000).timestamp()),
        (3000, f32(value_of(3000, KEY_FID)), finish_time(3000).timestamp()),
    ]
    assert len(evalfarm_files(logdir)) == 1


def test_tensorboard_a_directory_that_cannot_be_made_is_a_clear_error(history: list[Point], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(EvalfarmError, match="cannot make that directory"):
        export_run(RUN, history, f"tensorboard:{tmp_path / 'a-file' / 'tb'}")


def test_tensorboard_leaves_the_training_jobs_event_file_untouched(history: list[Point], logdir: Path) -> None:
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from torch.utils.tensorboard import SummaryWriter

    training = SummaryWriter(str(logdir))
    for step in (500, 1000, 1500):
        training.add_scalar("train/loss", 1 / step, step)
    training.close()
    EventFileWriter(str(logdir), filename_suffix=".other").close()  # any file not ours, even with a suffix
    before = {p.name: p.read_bytes() for p in logdir.iterdir()}

    export_run(RUN, history, f"tensorboard:{logdir}")
    export_run(RUN, add_step_between(), f"tensorboard:{logdir}")

    assert {p.name: p.read_bytes() for p in logdir.iterdir() if p.suffix != ".evalfarm"} == before
    assert [s for s, _, _ in tb_scalars(logdir, "train/loss")] == [500, 1000, 1500]
    assert [s for s, _, _ in tb_scalars(logdir, f"evalfarm/{KEY_FID}")] == [1000, 1500, 2000, 3000]


def test_tensorboard_export_of_another_run_into_the_same_dir_keeps_the_first(history: list[Point],
                                                                              logdir: Path) -> None:
    store("other-run", 10, T0)
    export_run(RUN, history, f"tensorboard:{logdir}")
    export_run("other-run", run_history("other-run"), f"tensorboard:{logdir}")
    assert len(evalfarm_files(logdir)) == 2


# -- MLflow ---------------------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def mlflow_run(uri: str, experiment: str = "evalfarm", name: str = RUN):  # noqa: ANN201 - an mlflow Run
    """The one active MLflow run called `name` in `experiment`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == [name]
    return runs[0]


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, f"evalfarm/{key}")
    return sorted((m.step, m.value, m.timestamp) for m in history)


def ms(t: datetime) -> int:
    return round(t.timestamp() * 1000)


def test_mlflow_holds_every_stored_value_at_its_step_with_its_finish_time(history: list[Point],
                                                                          mlflow_uri: str) -> None:
    assert export_run(RUN, history, f"mlflow:{mlflow_uri}#gan") == 3
    run = mlflow_run(mlflow_uri, "gan")
    assert run.data.tags["evalfarm.run"] == RUN
    for key in METRIC_KEYS:
        assert mlflow_history(mlflow_uri, run.info.run_id, key) == [
            (step, value_of(step, key), ms(finish_time(step))) for step in (1000, 2000, 3000)
        ]


def test_mlflow_export_again_logs_nothing(history: list[Point], mlflow_uri: str) -> None:
    export_run(RUN, history, f"mlflow:{mlflow_uri}")
    assert export_run(RUN, history, f"mlflow:{mlflow_uri}") == 0
    run = mlflow_run(mlflow_uri)
    assert [s for s, _, _ in mlflow_history(mlflow_uri, run.info.run_id, KEY_FID)] == [1000, 2000, 3000]


def test_mlflow_a_step_finished_late_is_added(history: list[Point], mlflow_uri: str) -> None:
    export_run(RUN, history, f"mlflow:{mlflow_uri}")
    assert export_run(RUN, add_step_between(), f"mlflow:{mlflow_uri}") == 1
    run = mlflow_run(mlflow_uri)
    assert mlflow_history(mlflow_uri, run.info.run_id, KEY_KID_MEAN) == [
        (1000, value_of(1000, KEY_KID_MEAN), ms(finish_time(1000))),
        (1500, value_of(1500, KEY_KID_MEAN), ms(T0 + timedelta(minutes=20))),
        (2000, value_of(2000, KEY_KID_MEAN), ms(finish_time(2000))),
        (3000, value_of(3000, KEY_KID_MEAN), ms(finish_time(3000))),
    ]


def test_mlflow_results_join_the_training_run_of_that_name(history: list[Point], mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp_id = client.create_experiment("training")
    training = client.create_run(exp_id, run_name=RUN)
    client.log_metric(training.info.run_id, "loss", 0.5, step=1000)

    export_run(RUN, history, f"mlflow:{mlflow_uri}#training")

    run = mlflow_run(mlflow_uri, "training")
    assert run.info.run_id == training.info.run_id
    assert set(run.data.metrics) == {"loss", *(f"evalfarm/{k}" for k in METRIC_KEYS)}


# -- W&B (offline) --------------------------------------------------------------------------------------------


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline, writing under this test's directory, and never reaching for the network."""
    path = tmp_path / "wandb"
    path.mkdir()
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(path), "WANDB_SILENT": "true",
                        "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(name, value)
    return path


def wandb_records(path: Path) -> Iterator[object]:
    """The records of a `.wandb` file: a 7-byte header, then LevelDB-log chunks (32 KiB blocks; each chunk a
    CRC-32 of type and data, a length and a type: full, first, middle, last) of `Record` protobufs."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B\xe1\xbe\x00"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + body) == crc
        parts.append(body)
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_history(wandb_dir: Path, run_id: str) -> list[dict[str, object]]:
    """Every history row logged to W&B run `run_id`, export after export (each offline export is a run dir)."""
    rows = []
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/*.wandb")):
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "run" and r.run.run_id == run_id for r in records):
            rows += [{item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                     for r in records if r.WhichOneof("record_type") == "history"]
    return rows


def test_wandb_logs_every_stored_value_against_its_step_in_step_order(history: list[Point], wandb_dir: Path) -> None:
    assert export_run(RUN, history, "wandb:gan-project") == 3
    rows = wandb_history(wandb_dir, default_run_id(RUN))
    assert [r["evalfarm/step"] for r in rows] == [1000, 2000, 3000]
    for row in rows:
        step = row["evalfarm/step"]
        assert {k: row[f"evalfarm/{k}"] for k in METRIC_KEYS} == {k: value_of(step, k) for k in METRIC_KEYS}
        assert row["_timestamp"] == finish_time(step).timestamp()


def test_wandb_plots_evalfarm_metrics_against_evalfarm_step(history: list[Point], wandb_dir: Path) -> None:
    export_run(RUN, history, "wandb:gan-project/my-run_1")
    (path,) = wandb_dir.glob("wandb/offline-run-*/*.wandb")
    metrics = {r.metric.glob_name or r.metric.name: r.metric.step_metric
               for r in wandb_records(path) if r.WhichOneof("record_type") == "metric"}
    assert metrics["evalfarm/*"] == "evalfarm/step"


def test_wandb_logs_into_the_run_id_the_target_names(history: list[Point], wandb_dir: Path) -> None:
    export_run(RUN, history, "wandb:gan-project/my-run_1")
    assert [r["evalfarm/step"] for r in wandb_history(wandb_dir, "my-run_1")] == [1000, 2000, 3000]


def test_wandb_offline_each_export_holds_the_whole_history(history: list[Point], wandb_dir: Path) -> None:
    """`wandb sync` of several offline runs with one id keeps the last one synced, not their union: so the
    newest offline run alone must hold every result, in step order."""
    export_run(RUN, history, "wandb:gan-project")
    assert export_run(RUN, add_step_between(), "wandb:gan-project") == 4
    newest = sorted(wandb_dir.glob("wandb/offline-run-*"))[-1]
    rows = [{item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for path in newest.glob("*.wandb") for r in wandb_records(path)
            if r.WhichOneof("record_type") == "history"]
    assert [r["evalfarm/step"] for r in rows] == [1000, 1500, 2000, 3000]


def wandb_processes() -> list[str]:
    """W&B service processes started for this test process (wandb-core is told its parent's pid)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"wandb-core") for a in args) and str(os.getpid()).encode() in args:
            found.append(str(cmdline.parent))
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads processes from /proc")
def test_wandb_export_leaves_no_wandb_process_running(history: list[Point], wandb_dir: Path) -> None:
    export_run(RUN, history, "wandb:gan-project")
    assert wandb_processes() == []


@pytest.mark.parametrize("name", ["gan-lr2e-4", "gan/lr=2e-4 (ema)", "x" * 100, "ÿ"])
def test_wandb_run_id_of_a_name_is_deterministic_and_legal(name: str) -> None:
    run_id = default_run_id(name)
    assert run_id == default_run_id(name)
    assert parse_target(f"wandb:p/{run_id}").name == run_id
    assert len(run_id) <= 64


def test_wandb_run_ids_of_names_that_differ_only_in_illegal_characters_differ() -> None:
    assert default_run_id("gan/a") != default_run_id("gan a")


# -- what every backend shares --------------------------------------------------------------------------------


def test_results_without_a_step_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store(RUN, 1000, T0)
    store(RUN, None, T0 + timedelta(minutes=1))
    store(RUN, None, T0 + timedelta(minutes=2))
    with caplog.at_level(logging.WARNING, logger="evalfarm.export"):
        assert export_run(RUN, run_history(RUN), f"tensorboard:{tmp_path}") == 1
    assert "2 of 3 results have no step" in caplog.text
    assert [s for s, _, _ in tb_scalars(tmp_path, f"evalfarm/{KEY_FID}")] == [1000]


def test_a_run_without_any_step_writes_nothing(tmp_path: Path) -> None:
    store(RUN, None, T0)
    assert export_run(RUN, run_history(RUN), f"tensorboard:{tmp_path / 'logs'}") == 0
    assert not (tmp_path / "logs").exists()


def test_only_the_metrics_a_result_has_are_written(tmp_path: Path) -> None:
    store(RUN, 1000, T0, {KEY_FID: 12.5})
    store(RUN, 2000, T0, {KEY_IS_MEAN: 3.25, KEY_IS_STD: 0.5, KEY_FID: 10.5, KEY_KID_MEAN: 0.01, KEY_KID_STD: 0.002})
    export_run(RUN, run_history(RUN), f"tensorboard:{tmp_path}")
    assert [(s, v) for s, v, _ in tb_scalars(tmp_path, f"evalfarm/{KEY_FID}")] == [(1000, 12.5), (2000, 10.5)]
    assert [(s, v) for s, v, _ in tb_scalars(tmp_path, f"evalfarm/{KEY_IS_MEAN}")] == [(2000, 3.25)]


@pytest.mark.parametrize("text,target", [
    ("tensorboard:runs/gan", Target("tensorboard", "runs/gan")),
    ("mlflow:sqlite:///m.db", Target("mlflow", "sqlite:///m.db")),
    ("mlflow:http://host:5000#a#b", Target("mlflow", "http://host:5000#a", "b")),
    ("wandb:proj", Target("wandb", "proj")),
    ("wandb:proj/run-1_a", Target("wandb", "proj", "run-1_a")),
])
def test_a_target_is_parsed_into_its_parts(text: str, target: Target) -> None:
    assert parse_target(text) == target
    assert str(parse_target(text)) == text


@pytest.mark.parametrize("text", [
    "foo:bar", "tensorboard", "tensorboard:", "mlflow:", "mlflow:#exp", "mlflow:sqlite:///m.db#", "wandb:",
    "wandb:/run", "wandb:team/proj/run", "wandb:pro:ject", "tensorboard:s3://bucket/logs",
])
def test_a_bad_target_is_an_error_naming_the_accepted_forms(text: str) -> None:
    with pytest.raises(EvalfarmError) as info:
        parse_target(text)
    assert TARGET_FORMS in str(info.value)
    assert "\n" not in str(info.value)


def test_parsing_targets_imports_no_backend_library() -> None:
    code = ("import sys\nfrom evalfarm.export import parse_target\n"
            "for t in ('tensorboard:d', 'mlflow:sqlite:///x.db#e', 'wandb:p/r'): parse_target(t)\n"
            "print(sorted(m for m in ('tensorboard', 'mlflow', 'wandb', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("library,target", [
    ("tensorboard", "tensorboard:{tmp}"), ("mlflow", "mlflow:sqlite:///{tmp}/m.db"), ("wandb", "wandb:p"),
])
def test_a_missing_backend_library_names_the_extra_to_install(library: str, target: str, history: list[Point],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == library or m.startswith(f"{library}.")] or [library]:
        monkeypatch.setitem(sys.modules, name, None)  # what an import meets where the library is not installed
    with pytest.raises(EvalfarmError, match=rf"pip install 'evalfarm\[{library}\]'"):
        export_run(RUN, history, target.format(tmp=tmp_path))


# -- the CLI --------------------------------------------------------------------------------------------------


def test_cli_refuses_a_bad_target_in_one_line() -> None:
    out = run_cli("export", "--run", "r", "--to", "foo:x")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith("error: ") and TARGET_FORMS in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_exports_a_run_to_tensorboard_and_mlflow(history: list[Point], tmp_path: Path) -> None:
    logdir, uri = tmp_path / "tb", f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_cli("export", "--run", RUN, "--to", f"tensorboard:{logdir}", "--to", f"mlflow:{uri}#exp")
    assert out.returncode == 0, out.stderr
    assert f"run {RUN}: 3 of 3 results written to tensorboard:{logdir}" in out.stdout
    assert f"run {RUN}: 3 of 3 results written to mlflow:{uri}#exp" in out.stdout
    expected = [(step, value_of(step, KEY_FID)) for step in (1000, 2000, 3000)]
    assert [(s, v) for s, v, _ in tb_scalars(logdir, f"evalfarm/{KEY_FID}")] == [(s, f32(v)) for s, v in expected]
    run = mlflow_run(uri, "exp")
    assert [(s, v) for s, v, _ in mlflow_history(uri, run.info.run_id, KEY_FID)] == expected
