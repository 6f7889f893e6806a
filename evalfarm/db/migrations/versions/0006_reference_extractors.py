"""references.extractors: the weights and cached statistics of each extractor a named reference was made with

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for every existing reference: they hold Inception's statistics alone, in weights_sha256 and store_key.
    op.add_column("references", sa.Column("extractors", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("references", "extractors")
