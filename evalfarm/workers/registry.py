"""Which weights the farm's workers hold, as they announce it in Redis: the API refuses at submit (409) a
job pinned to weights that no live worker holds, instead of letting it fail at planning."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

PREFIX = "evalfarm:weights:"


def announce(client: redis.Redis, weights_sha256: str, worker: str, ttl_s: int) -> None:
    """Refreshed by every worker's main process; it lapses `ttl_s` after the last worker with them stopped."""
    client.set(f"{PREFIX}{weights_sha256}:{worker}", "1", ex=ttl_s)


def held_weights(client: redis.Redis) -> set[str]:
    """SHA-256 of the weights some live worker holds (empty when no worker announced itself lately)."""
    return {k.decode()[len(PREFIX):].split(":", 1)[0] for k in client.scan_iter(match=PREFIX + "*", count=500)}
