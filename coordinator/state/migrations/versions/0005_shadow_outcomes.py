"""Shadow outcomes (scores and timings of each sampled request's two sides) move from each
coordinator's memory to the state database, so both coordinators of a pair, and one that
restarted, report the run's pooled figures (docs/shadow.md).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

REAL = sa.Double().with_variant(sa.REAL(), "sqlite")
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
EMPTY = sa.text("''")


def upgrade() -> None:
    op.create_table(
        "shadow_outcomes",
        sa.Column("id", BIGINT, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("instance", sa.Text, nullable=False),
        sa.Column("template", sa.Text, nullable=False),
        sa.Column("side", sa.Text, nullable=False),
        sa.Column("completed", sa.Integer, nullable=False),
        sa.Column("latency_ms", REAL, nullable=False),
        sa.Column("ttft_ms", REAL, nullable=True),
        sa.Column("score", REAL, nullable=True),
        sa.Column("schema_valid", sa.Integer, nullable=True),
        sa.Column("parts", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("model", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("digest", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("at", REAL, nullable=False),
    )
    op.create_index("ix_shadow_outcomes_run_id", "shadow_outcomes", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_shadow_outcomes_run_id", "shadow_outcomes")
    op.drop_table("shadow_outcomes")
