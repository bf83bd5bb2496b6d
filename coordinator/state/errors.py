"""The state database's one error (engine.py, migrate.py)."""


class StateError(OSError):
    """The state database cannot be opened or brought up to date; the message names the
    (redacted) URL and what to do. An OSError, so the daemon exits 1 with it."""
