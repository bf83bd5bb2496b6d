"""A `--state-url` checked and shown safely (docs/state.md): which databases the
coordinator's state may live in, and the URL with its password hidden for logs and errors.
Pure functions of the URL, so the settings can check it without opening anything."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.engine import URL, make_url

SCHEMES = ("sqlite", "postgresql")


def redact(url: str | URL) -> str:
    """The URL with its password replaced by ***, safe for logs and errors."""
    try:
        parsed = url if isinstance(url, URL) else make_url(str(url))
        return parsed.render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: hide anything between :// and @
        return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", str(url))


def parse(url: str) -> URL:
    """A --state-url checked: sqlite:///PATH or postgresql://...; ValueError (redacted) otherwise."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - SQLAlchemy's message would repeat the URL
        raise ValueError(
            "--state-url is not a URL (not repeated here: it may hold a password): give sqlite:///PATH or "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if (
        backend not in SCHEMES
        or (backend == "postgresql" and driver not in ("", "psycopg"))
        or (backend == "sqlite" and driver not in ("", "pysqlite"))
    ):
        raise ValueError(
            f"--state-url {redact(url)!r}: the state database is sqlite:///PATH or "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (PostgreSQL 15+)"
        )
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ValueError(
            "--state-url sqlite:///PATH needs a file path (coordinators and restarts share it)"
        )
    if backend == "postgresql" and not parsed.database:
        raise ValueError(
            f"--state-url {redact(url)!r} names no database: postgresql://USER@HOST:PORT/DATABASE"
        )
    return parsed.set(drivername="sqlite" if backend == "sqlite" else "postgresql+psycopg")


def url_for(state_url, state_db: Path) -> str:
    """What the coordinator opens: --state-url (a str or pydantic SecretStr), else --state-db
    as sqlite:///PATH, so configs from before --state-url keep their file."""
    if state_url is not None and hasattr(state_url, "get_secret_value"):
        state_url = state_url.get_secret_value()
    return state_url or f"sqlite:///{Path(state_db)}"
