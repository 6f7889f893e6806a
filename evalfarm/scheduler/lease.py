"""The lease of a running step: one thread that heart-beats it and notices when its job moved on.

A shard, a planner or a reducer whose heartbeat is older than EVALFARM_LEASE_S is presumed dead (worker
killed, machine lost) and the reconciler sends its step again. The beat is kept apart from the work loop,
so a slow batch never looks like a death, and the same beat reads the job's state, so the loop checks for
a cancel without a query of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from evalfarm.db import JobState

log = logging.getLogger(__name__)

CANCEL_POLL_S = 2.0  #: the longest a running step takes to notice a cancel, whatever the heartbeat period


class Lease(threading.Thread):
    """`with Lease(beat, expect) as lease:` beats while the block runs; `lease.stopped()` says the job left
    the state `expect` (cancelled, failed, ...). `beat` refreshes the heartbeat and returns the job's state."""

    def __init__(self, beat: Callable[[], JobState | None], expect: JobState, every_s: float) -> None:
        super().__init__(name="evalfarm-lease", daemon=True)
        self.beat, self.expect = beat, expect
        self.every_s = min(every_s, CANCEL_POLL_S)
        self._done, self._stopped = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                if self.beat() != self.expect:
                    self._stopped.set()
            except Exception:  # a missed beat is not fatal; the lease is several beats long
                log.warning("heartbeat failed", exc_info=True)

    def stopped(self) -> bool:
        """True once a beat saw the job leave the state this step runs in."""
        return self._stopped.is_set()

    def __enter__(self) -> Lease:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._done.set()
        self.join(timeout=self.every_s + 5)
