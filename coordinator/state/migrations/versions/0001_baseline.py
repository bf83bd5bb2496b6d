"""Baseline: the tables of the release before migrations (commit 92239ae), exactly as its
stores created them in the SQLite file (api_tokens.py, rollout_store.py, request_log.py).

That release made each table when the feature using it first opened the file, and added
some columns on open to files from before them. So a file from it may hold any subset of
the tables, some lacking those columns: this revision creates what is missing and adds
those columns, and leaves every row as it was. On an empty database it creates them all.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

log = logging.getLogger("coordinator.state")

REAL = sa.Double().with_variant(sa.REAL(), "sqlite")
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
EMPTY = sa.text("''")  # DEFAULT '' (a text clause: Alembic compares a plain "" wrongly)
ZERO = sa.text("0")


def _tables() -> dict[str, tuple[list[sa.Column], list[str]]]:
    """Table -> (its columns, the names of those the release added to older files on open)."""
    return {
        "api_tokens": (
            [
                sa.Column("id", sa.Text, primary_key=True),
                sa.Column("hash", sa.Text, nullable=False),
                sa.Column("name", sa.Text, nullable=False),
                sa.Column("role", sa.Text, nullable=False),
                sa.Column("created", REAL, nullable=False),
                sa.Column("expires", REAL, nullable=False),
                sa.Column("revoked", REAL, nullable=False, server_default=ZERO),
                sa.Column("revoked_reason", sa.Text, nullable=False, server_default=EMPTY),
                sa.Column("created_by", sa.Text, nullable=False, server_default=EMPTY),
            ],
            [],
        ),
        "rollouts": (
            [
                sa.Column("id", sa.Text, primary_key=True),
                sa.Column("state", sa.Text, nullable=False),
                sa.Column("target", sa.Text, nullable=False),
                sa.Column("max_unavailable", sa.Integer, nullable=False),
                sa.Column("drain_timeout_s", REAL, nullable=False),
                sa.Column("message", sa.Text, nullable=False, server_default=EMPTY),
                sa.Column("created", REAL, nullable=False),
                sa.Column("updated", REAL, nullable=False),
                sa.Column("owner", sa.Text, nullable=False, server_default=EMPTY),
                sa.Column("started_by", sa.Text, nullable=False, server_default=EMPTY),
                sa.Column("wait_timeout_s", REAL, nullable=False, server_default=sa.text("300")),
            ],
            ["wait_timeout_s"],
        ),
        "rollout_nodes": (
            [
                sa.Column("rollout_id", sa.Text, primary_key=True),
                sa.Column("node_id", sa.Text, primary_key=True),
                sa.Column("position", sa.Integer, nullable=False),
                sa.Column("step", sa.Text, nullable=False, server_default="pending"),
                sa.Column("from_digest", sa.Text, nullable=False, server_default=EMPTY),
                sa.Column("message", sa.Text, nullable=False, server_default=EMPTY),
                sa.Column("started", REAL, nullable=False, server_default=ZERO),
                sa.Column("finished", REAL, nullable=False, server_default=ZERO),
                sa.Column("kept_out", sa.Integer, nullable=False, server_default=ZERO),
            ],
            ["kept_out"],
        ),
        "lease": (
            [
                sa.Column("name", sa.Text, primary_key=True),
                sa.Column("holder", sa.Text, nullable=False),
                sa.Column("expires", REAL, nullable=False),
                sa.Column("token", BIGINT, nullable=False, server_default=ZERO),
            ],
            ["token"],
        ),
        "requests": (
            [
                sa.Column("request_id", sa.Text, nullable=False),
                sa.Column("caller", sa.Text, nullable=False),
                sa.Column("priority", sa.Text, nullable=False),
                sa.Column("started_at", REAL, nullable=False),
                sa.Column("ended_at", REAL, nullable=False),
                sa.Column("outcome", sa.Text, nullable=False),
                sa.Column("code", sa.Text, nullable=False),
                sa.Column("queue_ms", REAL),
                sa.Column("ttft_ms", REAL),
                sa.Column("decode_ms", REAL, nullable=False),
                sa.Column("latency_ms", REAL, nullable=False),
                sa.Column("prompt_tokens", sa.Integer, nullable=False),
                sa.Column("completion_tokens", sa.Integer, nullable=False),
                sa.Column("nodes", sa.Text, nullable=False),
                sa.Column("failovers", sa.Integer, nullable=False),
                sa.Column("retries", sa.Integer, nullable=False),
                sa.Column("restarts", sa.Integer, nullable=False),
                sa.Column("finish_reason", sa.Text, nullable=False),
                sa.Column("quality_score", REAL),
                sa.Column("template", sa.Text, nullable=False, server_default=EMPTY),
                sa.Column("output_format", sa.Text, nullable=False, server_default=EMPTY),
                sa.Column("schema_valid", sa.Integer),
                sa.Column("quality_parts", sa.Text),
            ],
            ["template", "output_format", "schema_valid", "quality_parts"],
        ),
    }


INDEXES = (
    ("requests_ended", "requests", ["ended_at"]),
    ("requests_caller", "requests", ["caller", "ended_at"]),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    have = set(inspector.get_table_names())
    if have & set(_tables()):
        log.info(
            "state database from before migrations: keeping its tables %s, adding what is missing",
            ", ".join(sorted(have & set(_tables()))),
        )
    for name, (columns, added_later) in _tables().items():
        if name not in have:
            op.create_table(name, *columns)
            continue
        present = {c["name"] for c in inspector.get_columns(name)}
        for column in columns:
            if column.name not in present:
                if column.name not in added_later:
                    raise RuntimeError(
                        f"state database table {name} lacks column {column.name}, which every "
                        "release had: this is not a StudioFleet state database"
                    )
                op.add_column(name, column)
    for index, table, columns in INDEXES:
        op.create_index(index, table, columns, if_not_exists=True)


def downgrade() -> None:
    for index, table, _ in INDEXES:
        op.drop_index(index, table_name=table)
    for name in reversed(list(_tables())):
        op.drop_table(name)
