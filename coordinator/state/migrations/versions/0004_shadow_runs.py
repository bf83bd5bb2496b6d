"""Shadow runs (`fleetctl shadow start`) move from the coordinator's memory to the state
database, so a restarted coordinator resumes the run and its pair takes it up
(docs/shadow.md).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

REAL = sa.Double().with_variant(sa.REAL(), "sqlite")
EMPTY = sa.text("''")


def upgrade() -> None:
    op.create_table(
        "shadow_runs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("fraction", REAL, nullable=False),
        sa.Column("templates", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("margin", REAL, nullable=False),
        sa.Column("min_samples", sa.Integer, nullable=False),
        sa.Column("max_in_flight", sa.Integer, nullable=False),
        sa.Column("timeout_s", REAL, nullable=False),
        sa.Column("started_by", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("started_at", REAL, nullable=False),
        sa.Column("stopped_at", REAL, nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    op.drop_table("shadow_runs")
