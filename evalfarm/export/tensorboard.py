"""TensorBoard: the run's whole history, sorted by step, in one event file of evalfarm's own.

TensorBoard draws a line in file order, so appending a result that arrived late (step 2000 after 3000) would
zigzag. Each export therefore writes every result anew, in step order, into a fresh file (named
`….<run hash>.evalfarm`, renamed into place whole), then deletes this run's earlier evalfarm files. Other
event files in DIR (the training job's) are never touched.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evalfarm.errors import EvalfarmError
from evalfarm.export import metric_name, missing, wall_time

if TYPE_CHECKING:
    from evalfarm.export import Target
    from evalfarm.runs import Point

SUFFIX = ".evalfarm"  #: ends the name of every event file evalfarm writes, and of no other


def export(run: str, points: Sequence[Point], target: Target) -> int:
    """Replace this run's evalfarm event file in DIR by one holding `points` (sorted by step); all are written."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError as exc:
        raise missing("tensorboard", "tensorboard") from exc

    directory = Path(target.location).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalfarmError(f"tensorboard:{target.location}: cannot make that directory ({exc.strerror})") from None
    first = min((wall_time(p) for p in points), default=time.time())
    events = [Event(wall_time=first, file_version="brain.Event:2")]
    for p in points:
        values = [Summary.Value(tag=metric_name(k), simple_value=v) for k, v in sorted(p.metrics.items())]
        events.append(Event(wall_time=wall_time(p), step=p.step, summary=Summary(value=values)))

    ours = directory / event_file_name(run)
    # No "tfevents" in the temporary name: TensorBoard must not read a half-written file.
    partial = directory / f".evalfarm-{uuid.uuid4().hex}.tmp"
    try:
        with open(partial, "wb") as f:
            writer = RecordWriter(f)
            for event in events:
                writer.write(event.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, ours)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise EvalfarmError(f"tensorboard:{target.location}: cannot write there ({exc.strerror})") from None
    _remove_older(directory, run, ours)
    return len(points)


def event_file_name(run: str) -> str:
    """TensorBoard's naming (`events.out.tfevents.<time>.<host>.<pid>…`), ending in the run's hash and SUFFIX."""
    return (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
            f".{uuid.uuid4().hex[:8]}.{run_hash(run)}{SUFFIX}")


def run_hash(run: str) -> str:
    return hashlib.sha256(run.encode()).hexdigest()[:12]


def _remove_older(directory: Path, run: str, ours: Path) -> None:
    """Delete this run's evalfarm files written before ours. Only older ones: of two exports racing, the
    newest file survives whichever deletes first."""
    mine = (ours.stat().st_mtime_ns, ours.name)
    for old in directory.glob(f"events.out.tfevents.*.{run_hash(run)}{SUFFIX}"):
        try:
            if (old.stat().st_mtime_ns, old.name) < mine:
                old.unlink()
        except FileNotFoundError:  # another export removed it first
            pass
