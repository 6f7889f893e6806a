"""Schema upgrades keep every row: a user's local history survives a new evalfarm version."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event, text

from evalfarm.db import session as db_session


def test_upgrading_an_sqlite_database_that_holds_results_keeps_them(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'evalfarm.db'}")
    event.listen(engine, "connect", db_session._sqlite_pragmas)  # noqa: SLF001 - foreign keys on, as in use
    db_session.upgrade(engine, "0001")
    with engine.begin() as c:
        c.execute(text("INSERT INTO jobs (id, state, mode, kind, samples_uri, config, weights_sha256, tags, "
                       "created_at) VALUES ('j1', 'succeeded', 'embedded', 'eval', 's', '{}', 'w', '{}', '2026-01-01')"))
        c.execute(text("INSERT INTO shards (job_id, side, \"index\", start, stop, state, attempts) "
                       "VALUES ('j1', 'samples', 0, 0, 4, 'done', 1)"))
        c.execute(text("INSERT INTO results (job_id, name, value) VALUES ('j1', 'frechet_inception_distance', 1.5)"))

    db_session.upgrade(engine)

    with engine.connect() as c:
        counts = [c.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in ("jobs", "shards", "results")]
        assert counts == [1, 1, 1]
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1  # on again for everything after
