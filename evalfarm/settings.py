"""Deployment settings, read once from `EVALFARM_*` environment variables.

These say *where* things are (database, broker, feature store, weights); how a metric is computed lives
in `evalfarm.config.EvalConfig` and is recorded with every job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOME = Path(os.path.expanduser("~/.cache/evalfarm"))


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"EVALFARM_{name}")
    return value if value not in (None, "") else default


def _flag(name: str, default: bool) -> bool:
    value = _env(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def _optional_int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _list(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in (_env(name) or "").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    store: str = field(default_factory=lambda: _env("STORE", str(Path(_env("HOME", str(DEFAULT_HOME))) / "store")))
    """Feature store root: a local directory or any fsspec URL shared by all workers and the reducer; by
    default the `store` folder of the evalfarm home."""
    database_url: str = field(default_factory=lambda: _env("DATABASE_URL", "") or "")
    """SQLAlchemy URL; empty means an SQLite file in the evalfarm home (embedded mode)."""
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    """Celery broker and the home of transient shard partials (farm mode only)."""
    weights: str | None = field(default_factory=lambda: _env("WEIGHTS"))
    """Local Inception weight file; unset means the canonical file, downloaded once into the home."""
    home: str = field(default_factory=lambda: _env("HOME", str(DEFAULT_HOME)))
    """Local state of this machine: the embedded database and the weights cache."""
    allow_download: bool = field(default_factory=lambda: _flag("ALLOW_DOWNLOAD", True))
    """Set EVALFARM_ALLOW_DOWNLOAD=0 on air-gapped clusters to fail fast instead of trying the network."""
    device: str = field(default_factory=lambda: _env("DEVICE", "auto"))
    loader_workers: int | None = field(default_factory=lambda: _optional_int(_env("LOADER_WORKERS")))
    """DataLoader decode processes per featurizing process; unset: the cores left over, shared out (see
    `evalfarm.pipeline.featurize.default_num_workers`)."""
    heartbeat_s: float = field(default_factory=lambda: float(_env("HEARTBEAT_S", "10")))
    """How often a running shard refreshes its lease."""
    lease_s: float = field(default_factory=lambda: float(_env("LEASE_S", "45")))
    """A running shard silent this long is presumed dead (worker killed, machine lost) and requeued."""
    reconcile_s: float = field(default_factory=lambda: float(_env("RECONCILE_S", "15")))
    """How often one worker checks for expired leases and a restarted broker."""
    pending_s: float = field(default_factory=lambda: float(_env("PENDING_S", "600")))
    """A step sent this long ago that no worker has started is presumed lost and sent again. Longer than a
    shard waits in a busy queue, or duplicates (harmless: steps are idempotent) cost a little work each."""
    retention_s: float = field(default_factory=lambda: float(_env("RETENTION_S", "86400")))
    """Partials and store files of a job that ended longer ago than this are removed by the reconciler."""
    index_retention_s: float = field(default_factory=lambda: float(_env("INDEX_RETENTION_S", "604800")))
    """A tar's listing kept for the workers (`indexes/` in the feature store) that no plan has rewritten for
    this long is removed by the reconciler; a worker that needs it again lists the tar itself."""

    sample_roots: tuple[str, ...] = field(default_factory=lambda: _list("SAMPLE_ROOTS"))
    """Directories and URL prefixes the farm may read samples from (comma-separated). The API refuses any
    other path, and none at all while this is empty; workers check it again before reading when set."""
    callback_hosts: tuple[str, ...] = field(default_factory=lambda: _list("CALLBACK_HOSTS"))
    """Hosts (`host` or `host:port`) that job webhooks may be sent to; the farm posts nowhere else."""
    webhook_secret: str | None = field(default_factory=lambda: _env("WEBHOOK_SECRET"), repr=False)
    """HMAC-SHA256 key of the `X-Evalfarm-Signature` header of webhooks."""
    api_url: str | None = field(default_factory=lambda: _env("API_URL"))
    """The farm's HTTP API; when set, the light client and the CLI's farm commands speak to it."""
    api_token: str | None = field(default_factory=lambda: _env("API_TOKEN"), repr=False)
    """Bearer token sent to the API (`evalfarm token create`)."""

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.home) / 'evalfarm.db'}"

    @property
    def weights_cache(self) -> Path:
        return Path(self.home) / "weights"


def get_settings() -> Settings:
    """Settings as the environment says now (not cached: tests and workers set variables before calling)."""
    return Settings()
