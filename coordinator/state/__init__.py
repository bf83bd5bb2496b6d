"""The coordinator's state database (docs/state.md): SQLite or PostgreSQL behind one schema
(schema.py) with versioned migrations (migrate.py), opened from --state-url (engine.py)."""

from cluster.state_url import redact, url_for
from coordinator.state.engine import StateDB
from coordinator.state.errors import StateError

__all__ = ["StateDB", "StateError", "redact", "url_for"]
