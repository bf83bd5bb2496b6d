"""The client library's exception tree (studiofleet_client.errors), for fleetctl and the daemons."""

from __future__ import annotations

from studiofleet_client.errors import *  # noqa: F403 - the same public names
from studiofleet_client.errors import __all__  # noqa: F401
