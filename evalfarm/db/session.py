"""Engines and sessions. The schema is created and upgraded by Alembic, for SQLite and Postgres alike."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_MIGRATIONS = Path(__file__).with_name("migrations")
_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
"""Keyed by process as well as URL: a pool child forked after its parent connected must not share the
parent's sockets (two processes on one Postgres connection corrupt each other's protocol state)."""


def _normalize(url: str) -> str:
    # Users paste libpq URLs; SQLAlchemy's default Postgres driver is psycopg2, we ship psycopg 3.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def get_engine(url: str) -> Engine:
    """One engine per URL per process, migrated to the latest schema on first use."""
    url = _normalize(url)
    key = (os.getpid(), url)
    with _lock:
        if key not in _engines:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": 30})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            upgrade(engine)
            _engines[key] = engine
        return _engines[key]


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to `revision`, keeping every row.

    SQLite changes a column by copying its table and dropping the old one; with foreign keys on, that DROP
    would cascade into shards and results. So they are off for the migration (a pragma that only takes
    effect outside a transaction), as Alembic's batch mode asks, and on again after.
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # Serialize concurrent first starts of many workers on one database.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7215530)")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)
