"""SKELETON (to be written): the dashboard page and its JSON on the monitoring port."""

from __future__ import annotations

from aiohttp import web

from cluster.api import fleet_pb2


def add_routes(app: web.Application, coordinator) -> None:
    pass


def open_link(http, identity) -> fleet_pb2.DashboardLink:
    token = http.sessions.issue(identity)
    return fleet_pb2.DashboardLink(url=f"{http.scheme}://{http.address}/login?token={token}", expires_in_s=60)
