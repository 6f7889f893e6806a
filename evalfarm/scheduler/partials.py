"""Where finished shards leave their partial statistics and features until the reducer merges them.

Keyed by (job, side, shard): a shard that runs twice overwrites its own entry and never adds twice.
The embedded runner keeps them in memory; the farm keeps small partials in Redis and features in the
feature store (see `evalfarm.workers.partials`).
"""

from __future__ import annotations

from typing import Protocol

from evalfarm.pipeline import ShardOutput


class PartialStore(Protocol):
    def put(self, job_id: str, side: str, shard: int, output: ShardOutput) -> None: ...

    def get(self, job_id: str, side: str, shard: int, *, features: bool) -> ShardOutput | None:
        """The stored output, or None when it was lost (e.g. Redis restarted); features only if asked."""

    def drop(self, job_id: str) -> None: ...


class MemoryPartials:
    def __init__(self) -> None:
        self._items: dict[tuple[str, str, int], ShardOutput] = {}

    def put(self, job_id: str, side: str, shard: int, output: ShardOutput) -> None:
        self._items[(job_id, side, shard)] = output

    def get(self, job_id: str, side: str, shard: int, *, features: bool) -> ShardOutput | None:
        return self._items.get((job_id, side, shard))

    def drop(self, job_id: str) -> None:
        for key in [k for k in self._items if k[0] == job_id]:
            del self._items[key]
