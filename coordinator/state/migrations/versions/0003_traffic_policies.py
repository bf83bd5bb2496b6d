"""Traffic policies set with `fleetctl traffic` move from each coordinator's memory to the
state database, so coordinators sharing it follow one policy (docs/traffic.md).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

REAL = sa.Double().with_variant(sa.REAL(), "sqlite")
EMPTY = sa.text("''")


def upgrade() -> None:
    op.create_table(
        "traffic_policies",
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("weights", sa.Text, nullable=False),
        sa.Column("overflow", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("set_by", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("set_at", REAL, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("traffic_policies")
