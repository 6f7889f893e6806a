"""`evalfarm watch`: a sidecar beside a training job that evaluates each new complete sample set once.

Each poll lists the sets under the watched directory (`sets.discover`), starts the complete ones it has not
seen before, follows the ones in flight, and writes what it knows to the state file before it sleeps. A
set is started at most once:

- on the farm, its submit carries an idempotency key made of the run and the set's name, so a watcher
  killed between submitting and writing its state gets the same job back when it submits again;
- embedded, the set's evaluation runs here; a watcher killed during it leaves the set `submitted`, and the
  next watcher adopts the job if it succeeded after all, or else fails it as abandoned and evaluates again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalfarm.config import EvalConfig
from evalfarm.errors import EvalfarmError
from evalfarm.keys import METRIC_FAMILIES, METRIC_LABELS
from evalfarm.runs import ResultsSource
from evalfarm.states import JobState
from evalfarm.watch.sets import SampleSet, discover, step_parser
from evalfarm.watch.state import SetRecord, SetState, StateLock, WatchState

ABANDONED = "abandoned: the watcher stopped while evaluating it; evaluated again"
MAX_KEY = 200  #: the longest idempotency key the farm stores
UNSTABLE_POLLS = 3  #: `--once` gives up on a set still changing after this many polls


@dataclass(frozen=True)
class WatchOptions:
    root: Path
    run: str
    ref: str | None
    config: EvalConfig = field(default_factory=EvalConfig)
    pattern: str = "*"
    every_s: float = 60.0
    step_regex: str | None = None
    state_path: Path | None = None
    tags: dict[str, str] = field(default_factory=dict)
    exports: tuple[str, ...] = ()

    @property
    def state_file(self) -> Path:
        """Beside the samples by default, so that it moves with them; one per run."""
        return self.state_path or self.root / f".evalfarm-watch-{_safe(self.run)}.json"


class Backend:
    """Where sets are evaluated: here (`EmbeddedBackend`) or on the farm (`FarmBackend`)."""

    embedded: bool
    results: ResultsSource

    def start(self, s: SampleSet, key: str, opts: WatchOptions, on_job: Callable[[str], None]) -> dict | None:
        """Start evaluating `s`: the result when it is done already (embedded), else None (in flight)."""
        raise NotImplementedError

    def look(self, job_id: str) -> tuple[JobState, dict | None, str | None]:
        """The job's state, result and error now."""
        raise NotImplementedError

    def abandon(self, job_id: str) -> None:
        """Fail a job whose evaluation died with the watcher that ran it."""

    def transient(self, exc: BaseException) -> bool:
        """Whether `exc` is the farm not answering (the set is tried again next poll), not the set's fault."""
        return False


class EmbeddedBackend(Backend):
    """Each set evaluated on this machine, one at a time, by the runner behind `evalfarm eval`."""

    embedded = True

    def __init__(self, *, weights: str | None = None, device: str | None = None, progress: bool = False) -> None:
        from evalfarm.db import session_factory
        from evalfarm.runs import DatabaseResults
        from evalfarm.settings import get_settings

        self.settings = get_settings()
        self.sessions = session_factory(self.settings.db_url)
        self.results = DatabaseResults(self.settings)
        self.weights, self.device, self.progress = weights, device, progress

    def start(self, s: SampleSet, key: str, opts: WatchOptions, on_job: Callable[[str], None]) -> dict | None:
        from evalfarm.scheduler.embedded import run_embedded

        return run_embedded(str(s.path), opts.ref, opts.config, settings=self.settings, weights=self.weights,
                            device=self.device, run=opts.run, step=s.step, tags=opts.tags, progress=self.progress,
                            on_job=on_job)

    def look(self, job_id: str) -> tuple[JobState, dict | None, str | None]:
        from evalfarm.scheduler import records

        job = records.get_job(self.sessions, job_id)
        return job.state, job.result, job.error

    def abandon(self, job_id: str) -> None:
        from evalfarm.scheduler import records

        records.fail_job(self.sessions, job_id, ABANDONED)


class FarmBackend(Backend):
    """Each set submitted to the farm (its API, or its database directly), many in flight at once."""

    embedded = False

    def __init__(self, farm: Any) -> None:
        self.farm = self.results = farm

    def start(self, s: SampleSet, key: str, opts: WatchOptions, on_job: Callable[[str], None]) -> dict | None:
        on_job(self.farm.submit(str(s.path), opts.ref, opts.config, run=opts.run, step=s.step, tags=opts.tags,
                                idempotency_key=key))
        return None

    def look(self, job_id: str) -> tuple[JobState, dict | None, str | None]:
        st = self.farm.status(job_id)
        return JobState(st["state"]), st.get("result"), st.get("error")

    def transient(self, exc: BaseException) -> bool:
        from evalfarm.client import Client, Unavailable, Unreachable

        if isinstance(self.farm, Client):  # light: no database or broker libraries to ask
            return isinstance(exc, (Unreachable, Unavailable))
        from evalfarm.workers.outages import is_outage

        return is_outage(exc)


class Watcher:
    def __init__(self, opts: WatchOptions, backend: Backend, log: Callable[[str], None]) -> None:
        self.opts, self.backend, self.log = opts, backend, log
        self.steps = step_parser(opts.step_regex)
        self.state = WatchState.load(opts.state_file, opts.run)
        self._told: set[str] = set()  #: names already reported as skipped
        self._changing: dict[str, int] = {}  #: polls that saw each unstarted set still changing
        self._stop: Callable[[], bool] = lambda: False

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self, *, once: bool = False, stop: Callable[[], bool] = lambda: False) -> int:
        """Poll until `stop()`; with `once`, until what is there now has ended. 1 if a set failed, else 0."""
        self._stop = stop
        with StateLock(self.opts.state_file):
            while True:
                waiting = self.poll(settling=once)
                if stop() or (once and not waiting):
                    break
                _sleep(self.opts.every_s, stop)
        return 1 if any(r.state == SetState.FAILED for r in self.state.sets.values()) else 0

    def poll(self, *, settling: bool = False) -> bool:
        """One look at the directory; True while something is still to come (a set settling, a job running).
        With `settling`, a set still changing after `UNSTABLE_POLLS` polls is left for a later watch."""
        found, stepless = discover(self.opts.root, self.opts.pattern, self.steps, self._ignored())
        for name in sorted(set(stepless) - self._told):
            self.log(f"skipping {name}: no step in its name (pass --step-regex)")
            self._told.add(name)
        waiting, seen = False, {}
        for s in found:
            if self._stop():
                break
            rec = self.state.sets.get(s.name)
            if rec is None:
                try:
                    seen[s.name] = s.signature()
                except FileNotFoundError:
                    continue  # renamed or removed since the listing
                if s.done_marker() or self.state.seen.get(s.name) == seen[s.name]:
                    self._start(s)
                elif settling:
                    self._changing[s.name] = self._changing.get(s.name, 0) + 1
                    if self._changing[s.name] < UNSTABLE_POLLS:
                        waiting = True
                    elif s.name not in self._told:
                        self._told.add(s.name)
                        self.log(f"step {s.step}: {s.name} is still changing after {UNSTABLE_POLLS} polls; "
                                 "left for a later watch")
            elif rec.state == SetState.SUBMITTED:
                self._follow(s, rec)
            if (rec := self.state.sets.get(s.name)) is not None:
                if rec.state == SetState.SUCCEEDED and not rec.exported:
                    self._export(rec)
                waiting |= rec.state == SetState.SUBMITTED
        self.state.seen = seen
        self.state.save()
        return waiting

    # -- one set ---------------------------------------------------------------------------------------------------

    def _start(self, s: SampleSet) -> None:
        rec = SetRecord(step=s.step, key=self._key(s), state=SetState.SUBMITTED)
        self.state.sets[s.name] = rec
        self.state.save()  # before the job exists: a restart then knows this set was begun

        def on_job(job_id: str) -> None:
            rec.job_id = job_id
            self.state.save()

        how = "DONE marker" if s.done_marker() else "unchanged since the last poll"
        self.log(f"step {s.step}: {s.name} is complete ({how}); " +
                 ("evaluating" if self.backend.embedded else "submitting"))
        try:
            result = self.backend.start(s, rec.key, self.opts, on_job)
        except Exception as exc:
            if self.backend.transient(exc):
                del self.state.sets[s.name]  # the same key finds the same job if the submit got through
                self.log(f"step {s.step}: the farm did not answer ({_oneline(exc)}); trying again next poll")
                return
            self._ended(s, rec, JobState.FAILED, None, _oneline(exc))
            return
        if result is not None:
            self._ended(s, rec, JobState.SUCCEEDED, result, None)
        else:
            self.log(f"step {s.step}: job {rec.job_id}")
            self.state.save()

    def _follow(self, s: SampleSet, rec: SetRecord) -> None:
        if rec.job_id is None:  # stopped before the job was made, or before the farm answered its submit
            del self.state.sets[s.name]
            self._start(s)  # on the farm, the same idempotency key returns the job if it was made
            return
        try:
            state, result, error = self.backend.look(rec.job_id)
        except Exception as exc:
            if self.backend.transient(exc):
                return
            raise
        if state == JobState.SUCCEEDED or (state.final and not self.backend.embedded):
            self._ended(s, rec, state, result, error)
        elif self.backend.embedded:  # its evaluation died with an earlier watcher process
            if not state.final:
                self.backend.abandon(rec.job_id)
            self.log(f"step {s.step}: job {rec.job_id} was left unfinished by a stopped watcher; evaluating again")
            del self.state.sets[s.name]
            self._start(s)

    def _ended(self, s: SampleSet, rec: SetRecord, state: JobState, result: dict | None, error: str | None) -> None:
        if state == JobState.SUCCEEDED and result is not None:
            rec.state, rec.job_id = SetState.SUCCEEDED, result.get("job_id", rec.job_id)
            caveat = "" if result.get("weights_canonical", True) else "  [not the canonical weights: not publishable]"
            self.log(f"step {s.step}: {summary(result)}  (job {rec.job_id}){caveat}")
        else:
            rec.state, rec.error = SetState.FAILED, error or f"job {state}"
            self.log(f"step {s.step}: {s.name} {state}: {rec.error}")
        self.state.save()

    def _export(self, rec: SetRecord) -> None:
        if not self.opts.exports:
            rec.exported = True
            return
        from evalfarm.export import export_run
        from evalfarm.runs import run_history

        try:
            points = run_history(self.opts.run, self.backend.results)
            for target in self.opts.exports:
                export_run(self.opts.run, points, target)
        except Exception as exc:  # noqa: BLE001 - an export target down must not stop the watch
            self.log(f"step {rec.step}: export failed ({type(exc).__name__}: {exc}); trying again next poll")
            return
        rec.exported = True

    # -- names -----------------------------------------------------------------------------------------------------

    def _key(self, s: SampleSet) -> str:
        key = f"watch:{self.opts.run}:{s.name}"
        if len(key) <= MAX_KEY:
            return key
        import hashlib

        return f"watch:{hashlib.sha256(key.encode()).hexdigest()}"

    def _ignored(self) -> frozenset[str]:
        state = self.opts.state_file
        if state.parent.resolve() != self.opts.root.resolve():
            return frozenset()
        return frozenset({state.name, state.name + ".lock"})


def summary(result: dict[str, Any]) -> str:
    """`FID 12.3  IS 4.56 ± 0.12  KID 0.0123 ± 0.0021`: the families a result holds."""
    parts = []
    for family, (key, std_key) in METRIC_FAMILIES.items():
        if key in result:
            std = f" ± {result[std_key]:.3g}" if std_key and std_key in result else ""
            parts.append(f"{METRIC_LABELS[family]} {result[key]:.6g}{std}")
    return "  ".join(parts) or "no metric"


def _oneline(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0][:500] if text else ""
    return message if isinstance(exc, EvalfarmError) else f"{type(exc).__name__}: {message}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100]


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
