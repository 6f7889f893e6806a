"""The lease of a running shard: one thread that heart-beats it and notices when its job stops running.

The reconciler presumes a shard whose heartbeat is older than EVALFARM_LEASE_S dead (worker killed, machine
lost) and requeues it. The beat is kept apart from the batch loop, so a slow batch never looks like a death,
and the same beat reads the job's state, so the loop checks for a cancel without a query of its own.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from evalfarm.db import JobState
from evalfarm.scheduler import records

log = logging.getLogger(__name__)

CANCEL_POLL_S = 2.0  #: the longest a running shard takes to notice a cancel, whatever the heartbeat period


class Lease(threading.Thread):
    """`with Lease(...) as lease:` beats while the block runs; `lease.stopped()` says the job left `running`."""

    def __init__(self, sessions: records.Sessions, job_id: str, shard_id: int, every_s: float) -> None:
        super().__init__(name=f"evalfarm-lease-{shard_id}", daemon=True)
        self.sessions, self.job_id, self.shard_id = sessions, job_id, shard_id
        self.every_s = min(every_s, CANCEL_POLL_S)
        self._done, self._stopped = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                if records.beat(self.sessions, self.shard_id, self.job_id) != JobState.RUNNING:
                    self._stopped.set()
            except Exception:  # a missed beat is not fatal; the lease is several beats long
                log.warning("heartbeat of shard %s failed", self.shard_id, exc_info=True)

    def stopped(self) -> bool:
        """True once a beat saw the job cancelled, failed, or otherwise no longer running."""
        return self._stopped.is_set()

    def __enter__(self) -> Lease:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._done.set()
        self.join(timeout=self.every_s + 5)
