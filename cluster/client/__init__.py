"""The client library (the studiofleet-client distribution, package studiofleet_client)
under the name fleetctl, the daemons and the tests use; see studiofleet_client."""

from __future__ import annotations

from studiofleet_client import *  # noqa: F403 - the same public names
from studiofleet_client import __all__  # noqa: F401
