"""Requests and results of the client library (studiofleet_client.results)."""

from __future__ import annotations

from studiofleet_client.results import *  # noqa: F403 - the same public names
from studiofleet_client.results import __all__  # noqa: F401
