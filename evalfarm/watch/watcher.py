"""`evalfarm watch`: a sidecar beside a training job that evaluates each new complete sample set once.

Each poll follows the sets in flight, starts the complete sets not seen before, exports the run when it has
new results, and writes what it knows to the state file before it sleeps. A set is started at most once:

- on the farm, its submit carries an idempotency key made of the run and the set's name, so a watcher
  killed between submitting and writing its state (or one whose state file was lost) gets the same job back;
- embedded, the results database is asked before a set is evaluated: a job of that set that succeeded is
  adopted, and one left unfinished by a watcher that died is failed as abandoned and the set evaluated again.

Errors that are about the watch rather than one set (missing weights, a refused token, an unknown
reference, a submit the farm refuses) stop the watcher with that error and record nothing, so that fixing
them and starting again evaluates every set; only a set's own job failing marks the set failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalfarm.config import EvalConfig
from evalfarm.errors import EvalfarmError, JobNotFound
from evalfarm.keys import INCEPTION, METRIC_FAMILIES, METRIC_LABELS
from evalfarm.runs import ResultsSource
from evalfarm.states import JobState
from evalfarm.watch.sets import SampleSet, discover, step_parser
from evalfarm.watch.state import SetRecord, SetState, StateLock, WatchState

ABANDONED = "abandoned: the watcher stopped while evaluating it; evaluated again"
MAX_KEY = 200  #: the longest idempotency key the farm stores
UNSTABLE_POLLS = 3  #: `--once` gives up on a set still changing after this many polls


@dataclass(frozen=True)
class WatchOptions:
    """What `evalfarm watch` was asked to do: where, for which run, how to evaluate, where to export."""

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
    retry_failed: bool = False

    @property
    def state_file(self) -> Path:
        """Beside the samples by default, so that it moves with them; one per run."""
        return self.state_path or self.root / f".evalfarm-watch-{_safe(self.run)}.json"


@dataclass(frozen=True)
class Earlier:
    """A job the results database already holds for a set."""

    job_id: str
    state: JobState
    result: dict | None
    error: str | None


class Backend:
    """Where sets are evaluated: here (`EmbeddedBackend`) or on the farm (`FarmBackend`)."""

    results: ResultsSource

    def start(self, s: SampleSet, key: str, opts: WatchOptions, on_job: Callable[[str], None]) -> dict | None:
        """Start evaluating `s`: the result when it is done already (embedded), else None (in flight)."""
        raise NotImplementedError

    def look(self, job_id: str) -> Earlier:
        """The job now; JobNotFound when the farm does not know it."""
        raise NotImplementedError

    def earlier(self, s: SampleSet, opts: WatchOptions) -> Earlier | None:
        """A job this watcher's run already has for `s`, found without the state file (embedded: by its
        samples in the results database; the farm finds it by idempotency key instead)."""
        return None

    def unfinished(self, rec: SetRecord) -> bool:
        """What a record in flight means: True when its job goes on by itself (the farm runs it), False when
        its evaluation died with an earlier watcher process (embedded), and the set must start again."""
        return True

    def transient(self, exc: BaseException) -> bool:
        """Whether `exc` is the farm not answering (the set is tried again next poll), not the set's fault."""
        return False

    def check(self, opts: WatchOptions) -> None:
        """Refuse, before any set is started, what would fail every set (the farm's API checks at submit)."""


class EmbeddedBackend(Backend):
    """Each set evaluated on this machine, one at a time, by the runner behind `evalfarm eval`."""

    def __init__(self, *, weights: str | None = None, extractor_weights: dict[str, str] | None = None,
                 device: str | None = None, progress: bool = False) -> None:
        from evalfarm.db import session_factory
        from evalfarm.runs import DatabaseResults
        from evalfarm.settings import get_settings

        self.settings = get_settings()
        self.sessions = session_factory(self.settings.db_url)
        self.results = DatabaseResults(self.settings)
        self.weights, self.device, self.progress = weights, device, progress
        self.extractor_weights = extractor_weights or {}

    def start(self, s: SampleSet, key: str, opts: WatchOptions, on_job: Callable[[str], None]) -> dict | None:
        from evalfarm.scheduler.embedded import run_embedded

        return run_embedded(str(s.path), opts.ref, opts.config, settings=self.settings, weights=self.weights,
                            extractor_weights=self.extractor_weights, device=self.device, run=opts.run, step=s.step, tags=opts.tags, progress=self.progress,
                            on_job=on_job)

    def look(self, job_id: str) -> Earlier:
        from evalfarm.scheduler import records

        job = records.get_job(self.sessions, job_id)
        return Earlier(job.id, job.state, job.result, job.error)

    def earlier(self, s: SampleSet, opts: WatchOptions) -> Earlier | None:
        """A succeeded job of this run and set, adopted; unfinished ones (their watcher died) are failed."""
        from sqlalchemy import select

        from evalfarm.db import Job
        from evalfarm.scheduler import records

        with self.sessions() as session:
            jobs = session.execute(
                select(Job.id, Job.state, Job.result, Job.error)
                .where(Job.run == opts.run, Job.samples_uri == str(s.path), Job.mode == "embedded")
                .order_by(Job.created_at)
            ).all()
        for job in jobs:
            if not JobState(job.state).final:
                records.fail_job(self.sessions, job.id, ABANDONED)
        done = [j for j in jobs if j.state == JobState.SUCCEEDED]
        return Earlier(done[-1].id, JobState.SUCCEEDED, done[-1].result, None) if done else None

    def unfinished(self, rec: SetRecord) -> bool:
        return False

    def check(self, opts: WatchOptions) -> None:
        """The reference must be a named reference, a statistics file or a readable sample set: else every
        set's job would fail on it."""
        if opts.ref is None:
            return
        from evalfarm.errors import SourceError
        from evalfarm.scheduler import records
        from evalfarm.scheduler.references import is_stats_file
        from evalfarm.sources import open_source

        if records.named_reference(self.sessions, opts.ref) is not None or is_stats_file(opts.ref):
            return
        try:
            open_source(opts.ref)
        except SourceError as exc:
            raise SourceError(f"--ref {opts.ref!r} is neither a named reference (`evalfarm ref list`) nor a "
                              f"readable sample set: {exc}") from None


class FarmBackend(Backend):
    """Each set submitted to the farm (its API, or its database directly), many in flight at once."""

    def __init__(self, farm: Any) -> None:
        self.farm = self.results = farm

    def start(self, s: SampleSet, key: str, opts: WatchOptions, on_job: Callable[[str], None]) -> dict | None:
        on_job(self.farm.submit(str(s.path), opts.ref, opts.config, run=opts.run, step=s.step, tags=opts.tags,
                                idempotency_key=key))
        return None

    def look(self, job_id: str) -> Earlier:
        st = self.farm.status(job_id)
        return Earlier(job_id, JobState(st["state"]), st.get("result"), st.get("error"))

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
        self.failed_now = 0  #: sets whose job failed during this invocation: the exit status
        self.export_failed = False
        self._told: set[str] = set()  #: names already reported as skipped
        self._changing: dict[str, int] = {}  #: polls that saw each unstarted set still changing
        self._stop: Callable[[], bool] = lambda: False

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self, *, once: bool = False, stop: Callable[[], bool] = lambda: False) -> int:
        """Poll until `stop()`; with `once`, until what is there now has ended. 1 if a set failed during this
        run or, with `once`, an export could not be written; else 0."""
        self._stop = stop
        with StateLock(self.opts.state_file):
            self.state = WatchState.load(self.opts.state_file, self.opts.run)  # as the last holder left it
            self.backend.check(self.opts)
            failed = sorted(n for n, r in self.state.sets.items() if r.state == SetState.FAILED)
            if failed and self.opts.retry_failed:
                for name in failed:
                    del self.state.sets[name]
            elif failed:
                self.log(f"{len(failed)} set(s) failed in an earlier watch and are not evaluated again: "
                         f"{', '.join(failed)} (their errors are in {self.opts.state_file}; --retry-failed "
                         "evaluates them again)")
            while True:
                waiting = self.poll(settling=once)
                if stop() or (once and not waiting):
                    break
                _sleep(self.opts.every_s, stop)
        return 1 if self.failed_now or (once and self.export_failed) else 0

    def poll(self, *, settling: bool = False) -> bool:
        """One look: follow what is in flight, start what is complete, export what is new. True while
        something is still to come (a set settling, a job running). With `settling`, a set still changing
        after `UNSTABLE_POLLS` polls is left for a later watch."""
        now = time.time()
        found, skipped = discover(self.opts.root, self.opts.pattern, self.steps)
        for name, why in skipped.items():
            if name not in self._told and name not in self.state.sets:
                self.log(f"skipping {name}: {why}")
                self._told.add(name)
        on_disk = {s.name: s for s in found}
        for name, rec in list(self.state.sets.items()):  # whether or not the set is still on disk
            if rec.state == SetState.SUBMITTED and not self._stop():
                self._follow(name, rec, on_disk.get(name))
        seen: dict[str, list[int]] = {}
        for s in found:
            if s.name in self.state.sets or self._stop():
                continue
            try:
                seen[s.name] = s.signature()
            except FileNotFoundError:
                continue  # renamed or removed since the listing
            if s.done_marker() or self._unchanged(s.name, seen[s.name], now):
                self._start(s)
            elif settling:
                self._changing[s.name] = self._changing.get(s.name, 0) + 1
                if self._changing[s.name] > UNSTABLE_POLLS and s.name not in self._told:
                    self._told.add(s.name)
                    self.log(f"step {s.step}: {s.name} is still changing after {UNSTABLE_POLLS} polls; left for "
                             "a later watch")
        self._export()
        self.state.seen, self.state.seen_at = seen, now
        self.state.save()
        return any(r.state == SetState.SUBMITTED for r in self.state.sets.values()) or (
            settling and any(0 < self._changing.get(n, 0) <= UNSTABLE_POLLS for n in seen))

    def _unchanged(self, name: str, signature: list[int], now: float) -> bool:
        """The same signature as at the last poll, which was at least a poll interval ago (a watcher
        restarted a moment after the last one stopped must not take a set mid-write for complete)."""
        if self.state.seen.get(name) != signature or self.state.seen_at is None:
            return False
        return now - self.state.seen_at >= 0.9 * self.opts.every_s

    # -- one set ---------------------------------------------------------------------------------------------------

    def _start(self, s: SampleSet) -> None:
        earlier = self.backend.earlier(s, self.opts)
        if earlier is not None:  # evaluated by a watcher whose state is lost
            self.state.sets[s.name] = SetRecord(step=s.step, key=self._key(s), state=SetState.SUBMITTED)
            self.log(f"step {s.step}: {s.name} was evaluated already (job {earlier.job_id}); not again")
            self._ended(s.name, self.state.sets[s.name], earlier)
            return
        rec = SetRecord(step=s.step, key=self._key(s), state=SetState.SUBMITTED)
        self.state.sets[s.name] = rec
        self.state.save()  # before the job exists: a restart then knows this set was begun

        def on_job(job_id: str) -> None:
            rec.job_id = job_id
            self.state.save()

        how = "DONE marker" if s.done_marker() else "unchanged since the last poll"
        self.log(f"step {s.step}: {s.name} is complete ({how}); " +
                 ("submitting" if self.backend.unfinished(rec) else "evaluating"))
        try:
            result = self.backend.start(s, rec.key, self.opts, on_job)
        except Exception as exc:
            if self._stop():  # stopped mid-evaluation (a signal to the whole process group kills the loaders)
                del self.state.sets[s.name]
                self.state.save()
                self.log(f"step {s.step}: stopped while evaluating {s.name}; the next watch evaluates it")
                return
            if rec.job_id is None:  # no job was made: nothing about this set is known yet
                del self.state.sets[s.name]
                self.state.save()
                if self.backend.transient(exc):
                    self.log(f"step {s.step}: the farm did not answer ({_oneline(exc)}); trying again next poll")
                    return
                raise  # the watch cannot go on as it is (weights, token, reference, settings): stop, say why
            self._ended(s.name, rec, Earlier(rec.job_id, JobState.FAILED, None, _oneline(exc)))
            return
        if result is not None:
            self._ended(s.name, rec, Earlier(rec.job_id or result["job_id"], JobState.SUCCEEDED, result, None))
        else:
            self.log(f"step {s.step}: job {rec.job_id}")

    def _follow(self, name: str, rec: SetRecord, s: SampleSet | None) -> None:
        if rec.job_id is None or not self.backend.unfinished(rec):
            # Stopped before its job was made, or its evaluation died with an earlier watcher: begin again
            # (the farm's idempotency key, or the embedded lookup, finds a job that was made after all).
            del self.state.sets[name]
            if s is not None:
                self._start(s)
            return
        try:
            job = self.backend.look(rec.job_id)
        except JobNotFound:  # the farm lost it (a new database, another API URL): submit it again
            del self.state.sets[name]
            self.log(f"step {rec.step}: the farm knows no job {rec.job_id}; submitting {name} again")
            if s is not None:
                self._start(s)
            return
        except Exception as exc:
            if self.backend.transient(exc):
                return
            raise
        if job.state.final:
            self._ended(name, rec, job)

    def _ended(self, name: str, rec: SetRecord, job: Earlier) -> None:
        rec.job_id = job.job_id
        if job.state == JobState.SUCCEEDED and job.result is not None:
            rec.state = SetState.SUCCEEDED
            caveat = "" if job.result.get("weights_canonical", True) else "  [not the canonical weights: not publishable]"
            self.log(f"step {rec.step}: {summary(job.result)}  (job {rec.job_id}){caveat}")
        else:
            rec.state, rec.error = SetState.FAILED, job.error or f"job {job.state}"
            self.failed_now += 1
            self.log(f"step {rec.step}: {name} {job.state}: {rec.error}")
        self.state.save()

    def _export(self) -> None:
        """Write the run to each target that lacks one of its results: once per poll, whatever the number of
        new results; a target that fails is tried again on the next poll."""
        done = sorted(r.job_id for r in self.state.sets.values() if r.state == SetState.SUCCEEDED and r.job_id)
        behind = [t for t in self.opts.exports if not set(done) <= set(self.state.exported.get(t, ()))]
        if not behind:
            return
        from evalfarm.export import export_run
        from evalfarm.runs import run_history

        try:
            points = run_history(self.opts.run, self.backend.results)
        except Exception as exc:  # noqa: BLE001 - the results database or API down: next poll
            self.export_failed = True
            self.log(f"export: the run's results could not be read ({_oneline(exc)}); trying again next poll")
            return
        for target in behind:
            try:
                export_run(self.opts.run, points, target)
            except Exception as exc:  # noqa: BLE001 - an export target down must not stop the watch
                self.export_failed = True
                self.log(f"export to {target} failed ({_oneline(exc)}); trying again next poll")
                continue
            self.state.exported[target] = done

    # -- names -----------------------------------------------------------------------------------------------------

    def _key(self, s: SampleSet) -> str:
        key = f"watch:{self.opts.run}:{s.name}"
        if len(key) <= MAX_KEY:
            return key
        import hashlib

        return f"watch:{hashlib.sha256(key.encode()).hexdigest()}"


def summary(result: dict[str, Any]) -> str:
    """`FID 12.3  IS 4.56 ± 0.12  KID 0.0123 ± 0.0021`: the families a result holds, each labelled with its
    extractor where that is not Inception (`FID@dinov2-vit-l-14 3.1`)."""
    parts = []
    by_extractor = result.get("extractors") or {INCEPTION: {"metrics": result}}
    for extractor, info in by_extractor.items():
        values = info.get("metrics") or {}
        on = "" if extractor == INCEPTION else f"@{extractor}"
        for family, (key, std_key) in METRIC_FAMILIES.items():
            if key in values:
                std = f" ± {values[std_key]:.3g}" if std_key and std_key in values else ""
                parts.append(f"{METRIC_LABELS[family]}{on} {values[key]:.6g}{std}")
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
