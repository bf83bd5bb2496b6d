"""Dashboard sessions and the eval gate's baselines move from each coordinator's memory to
the state database, so coordinators sharing it share them (docs/state.md).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

REAL = sa.Double().with_variant(sa.REAL(), "sqlite")
EMPTY = sa.text("''")


def _operator() -> list[sa.Column]:
    """Who a link or a session acts as (cluster.security.identity.Identity)."""
    return [
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("serial", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("not_after", REAL),
    ]


def upgrade() -> None:
    op.create_table(
        "dashboard_links",
        sa.Column("digest", sa.Text, primary_key=True),
        *_operator(),
        sa.Column("expires", REAL, nullable=False),
    )
    op.create_table(
        "dashboard_sessions",
        sa.Column("digest", sa.Text, primary_key=True),
        *_operator(),
        sa.Column("created", REAL, nullable=False),
        sa.Column("last_used", REAL, nullable=False),
    )
    op.create_table(
        "eval_baselines",
        sa.Column("rollout_id", sa.Text, primary_key=True),
        sa.Column("digest", sa.Text, primary_key=True),
        sa.Column("report", sa.Text, nullable=False),
        sa.Column("created", REAL, nullable=False),
    )


def downgrade() -> None:
    for name in ("eval_baselines", "dashboard_sessions", "dashboard_links"):
        op.drop_table(name)
