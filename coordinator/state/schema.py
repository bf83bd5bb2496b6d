"""The state database's tables at the newest schema revision, as SQLAlchemy Core tables the
stores query. A change here needs a migration in migrations/versions/ that makes it (the
migrations test compares the two), and the migration files never import this module.

Timestamps are Unix seconds (REAL on SQLite, DOUBLE PRECISION on PostgreSQL); flags are
0/1 integers, as the SQLite file of the first release had them.
"""

from __future__ import annotations

import sqlalchemy as sa

REAL = sa.Double().with_variant(sa.REAL(), "sqlite")
EMPTY = sa.text("''")  # DEFAULT '' (a text clause: Alembic compares a plain "" wrongly)
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite's INTEGER is 64-bit already

metadata = sa.MetaData()

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("hash", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("created", REAL, nullable=False),
    sa.Column("expires", REAL, nullable=False),
    sa.Column("revoked", REAL, nullable=False, server_default=sa.text("0")),
    sa.Column("revoked_reason", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("created_by", sa.Text, nullable=False, server_default=EMPTY),
)

rollouts = sa.Table(
    "rollouts",
    metadata,
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
)

rollout_nodes = sa.Table(
    "rollout_nodes",
    metadata,
    sa.Column("rollout_id", sa.Text, primary_key=True),
    sa.Column("node_id", sa.Text, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("step", sa.Text, nullable=False, server_default="pending"),
    sa.Column("from_digest", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("message", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("started", REAL, nullable=False, server_default=sa.text("0")),
    sa.Column("finished", REAL, nullable=False, server_default=sa.text("0")),
    sa.Column("kept_out", sa.Integer, nullable=False, server_default=sa.text("0")),
)

# The rollout lease: one row per lease name; `token` is the fencing token (rollout_store.py).
lease = sa.Table(
    "lease",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("expires", REAL, nullable=False),
    sa.Column("token", BIGINT, nullable=False, server_default=sa.text("0")),
)

# The request log (request_log.py): metadata only, no column for a prompt or a completion.
requests = sa.Table(
    "requests",
    metadata,
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
    sa.Index("requests_ended", "ended_at"),
    sa.Index("requests_caller", "caller", "ended_at"),
)

# Dashboard login links and browser sessions (coordinator/session_store.py), by the SHA-256
# of their secret (never the secret): the operator each acts as, and its clocks.
dashboard_links = sa.Table(
    "dashboard_links",
    metadata,
    sa.Column("digest", sa.Text, primary_key=True),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("serial", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("not_after", REAL),
    sa.Column("expires", REAL, nullable=False),
)

dashboard_sessions = sa.Table(
    "dashboard_sessions",
    metadata,
    sa.Column("digest", sa.Text, primary_key=True),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("serial", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("not_after", REAL),
    sa.Column("created", REAL, nullable=False),
    sa.Column("last_used", REAL, nullable=False),
)

# The eval gate's baseline scores (coordinator/baseline_store.py): the current version's
# report per rollout, scores and case ids only (never a note), as evaluation.Report JSON.
eval_baselines = sa.Table(
    "eval_baselines",
    metadata,
    sa.Column("rollout_id", sa.Text, primary_key=True),
    sa.Column("digest", sa.Text, primary_key=True),
    sa.Column("report", sa.Text, nullable=False),
    sa.Column("created", REAL, nullable=False),
)

# The traffic policies operators set (coordinator/traffic_store.py; docs/traffic.md): one row
# per model id or "*", the weights as JSON ("" once cleared), so coordinators sharing the
# database follow one policy and a restarted one keeps it.
traffic_policies = sa.Table(
    "traffic_policies",
    metadata,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("weights", sa.Text, nullable=False),
    sa.Column("overflow", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("set_by", sa.Text, nullable=False, server_default=EMPTY),
    sa.Column("set_at", REAL, nullable=False),
)

# Shadow runs (coordinator/shadow_store.py; docs/shadow.md): each run's definition, one row
# per run (`stopped_at` 0 while active), so a restarted coordinator resumes the latest and
# its pair takes it up. The templates are a JSON list. No scores and no request content.
shadow_runs = sa.Table(
    "shadow_runs",
    metadata,
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

# Shadow outcomes (coordinator/shadow_store.py; docs/shadow.md): one row per side (live or
# candidate) of each sampled request, written by whichever coordinator relayed it, so every
# coordinator sharing the database reports the run's pooled figures. Scores and timings
# only: never request content. `instance` is the writing process (name/random), so a
# coordinator skips its own rows while following; `parts` is a JSON object of sub-scores;
# a NULL is what the outcome did not have (no score, no schema, no first token).
shadow_outcomes = sa.Table(
    "shadow_outcomes",
    metadata,
    sa.Column("id", BIGINT, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text, nullable=False, index=True),
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
