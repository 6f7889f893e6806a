"""counters: farm-wide totals that only grow (shards done and failed, images featurized), for /metrics

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # Start from what the shard rows say now; from here on, the events themselves count.
    bind = op.get_bind()
    done, images = bind.execute(sa.text(
        "SELECT count(*), coalesce(sum(stop - start), 0) FROM shards WHERE state = 'done'")).one()
    failed = bind.execute(sa.text(
        "SELECT count(*) FROM shards JOIN jobs ON jobs.id = shards.job_id "
        "WHERE shards.state = 'failed' AND jobs.state != 'cancelled'")).scalar()
    op.bulk_insert(counters, [{"name": "shards_done", "value": int(done)},
                              {"name": "shards_failed", "value": int(failed or 0)},
                              {"name": "images_featurized", "value": int(images)}])


def downgrade() -> None:
    op.drop_table("counters")
