"""The coordinator: one gRPC server (Inference + Fleet admin + health), the fleet view,
discovery, admission and the relay; start() and shutdown()."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from cluster.api import (
    FLEET_SERVICE,
    INFERENCE_SERVICE,
    SHADOW_SERVICE,
    fleet_pb2_grpc,
    inference_pb2_grpc,
    shadow_pb2_grpc,
)
from cluster.config import (
    AdmissionSection,
    CoordinatorSettings,
    HealthSection,
    RolloutSection,
    TrafficSection,
    http_address,
)
from cluster.daemon import SERVER_OPTIONS
from cluster.security.daemon import DaemonSecurity
from cluster.security.roles import COORDINATOR_HTTP_TABLE, COORDINATOR_TABLE
from coordinator.admin import FleetAdmin
from coordinator.admission import Admission
from coordinator.audit_trail import AuditTrail
from coordinator.baseline_store import BaselineStore
from coordinator.discovery import MdnsDiscovery
from coordinator.events import EventLog
from coordinator.fleet import Fleet
from coordinator.gates import default_gates
from coordinator.headroom import live_headroom
from coordinator.readiness import Readiness, ReadinessGate
from coordinator.relay import Relay
from coordinator.request_summary import Monitor
from coordinator.rollout_store import RolloutStore
from coordinator.rollouts import Rollouts, lease_holder
from coordinator.shadow import Shadow
from coordinator.shadow_admin import ShadowAdmin
from coordinator.shadow_store import ShadowStore
from coordinator.state import StateDB, url_for
from coordinator.traffic import TrafficControl
from coordinator.traffic_store import TrafficStore

log = logging.getLogger(__name__)

EXIT_AUDIT_BEHIND = (
    3  # a node witnessed audit records this chain no longer has (coordinator/audit_witness.py)
)


class Coordinator:
    def __init__(self, *, settings: CoordinatorSettings, security: DaemonSecurity, audit_log=None):
        self.settings = settings
        self.security = security
        self.audit = AuditTrail(audit_log, coordinator_id=settings.coordinator_id)
        self.authz = security.authorizer(
            COORDINATOR_TABLE,
            where=f"coordinator {settings.coordinator_id}",
            on_denied=self._denied,
        )
        self.events = EventLog()
        self.exit_code = 0
        self.witness = self._witness(audit_log)
        self.fleet = Fleet(
            settings=settings.section(HealthSection),
            events=self.events,
            on_change=self._fleet_changed,
            tls=security.client,
            revocations=security.server.revocations if security.server else None,
            witness=self.witness,
        )
        # Node classes and overflow (docs/traffic.md); it reads the queue and the live headroom.
        self.traffic = TrafficControl(
            settings=settings.section(TrafficSection),
            sla_p95_s=settings.sla_p95_s,
            profiles=lambda: self.headroom.profiles,
            fleet=self.fleet,
            events=self.events,
            waiting=lambda: self.admission.waiting(),
            on_overflow=lambda: self.admission.dispatch(),
            mix=lambda: self.headroom.meter.mix(),
        )
        self.admission = Admission(
            fleet=self.fleet,
            max_depth=settings.queue_max_depth,
            max_wait_s=settings.queue_max_wait_s,
            load_factor=settings.affinity_load_factor,
            traffic=self.traffic,
        )
        self.monitor = Monitor()
        # Copies of sampled live requests to a candidate model (docs/shadow.md).
        self.shadow = Shadow(
            fleet=self.fleet,
            admission=self.admission,
            audit=self.audit,
            coordinator_id=settings.coordinator_id,
        )
        self.monitor.sinks.append(self.shadow.live_ended)
        self.headroom = live_headroom(settings, self.fleet)  # docs/capacity.md "Live headroom"
        self.monitor.sinks.append(self.headroom.observe)
        self.relay = Relay(
            settings=settings.section(AdmissionSection),
            coordinator_id=settings.coordinator_id,
            fleet=self.fleet,
            admission=self.admission,
            events=self.events,
            identify=self.authz.peer,
            audit=self.audit,
            monitor=self.monitor,
            shadow=self.shadow,
        )
        # Rollouts and their lease, API tokens, the request log (docs/state.md); migrated on open.
        self.state = StateDB(url_for(settings.state_url, settings.state_db))
        self.traffic.store = TrafficStore(self.state)  # policies set with fleetctl traffic
        self.shadow.store = ShadowStore(self.state)  # the shadow run's definition
        log.info("coordinator=%s state database %s", settings.coordinator_id, self.state.shown)
        rollout = settings.section(RolloutSection)
        self.rollouts = Rollouts(
            settings=rollout,
            holder=lease_holder(settings),
            probe_timeout_s=settings.probe_timeout_s,
            fleet=self.fleet,
            events=self.events,
            gates=default_gates(rollout, shadow=self.shadow, baselines=BaselineStore(self.state)),
            store=RolloutStore(self.state),
            audit=self.audit,
        )
        self.metrics = None
        if settings.metrics:
            from coordinator.metrics import CoordinatorMetrics

            self.metrics = CoordinatorMetrics(
                coordinator_id=settings.coordinator_id,
                fleet=self.fleet,
                relay=self.relay,
                rollouts=self.rollouts,
                audit=self.audit,
                events=self.events,
                headroom=self.headroom,
            )
            self.monitor.sinks.append(self.metrics.request_ended)
            self.metrics.registry.register(self.traffic.collector())
            self.metrics.registry.register(self.shadow.collector())
        # Ready: the state database answers and a node is routable (docs/ha.md "Readiness").
        self.readiness = Readiness(
            state=self.state,
            fleet=self.fleet,
            interval_s=settings.readiness_interval_s,
            timeout_s=settings.readiness_timeout_s,
            on_change=self._readiness_changed,
            metrics=self.metrics,
            where=f"coordinator {settings.coordinator_id}",
        )
        self.announcer = None  # its mDNS announcement for clients (coordinator/announce.py)
        self.request_log = None
        if settings.request_log:
            from coordinator.request_log import RequestLog

            self.request_log = RequestLog(
                self.state, retention_days=settings.request_log_retention_days
            )
            self.monitor.sinks.append(self.request_log.record)
            if self.metrics is not None:
                self.metrics.watch_request_log(self.request_log)
        self.http = None  # the monitoring port (start)
        self.api = None  # the OpenAI-compatible front door (start)
        self.tokens = None  # its bearer tokens (coordinator/api_tokens.py)
        if http_address(settings.listen, settings.openai_listen, 2) is not None:
            from coordinator.api_tokens import TokenStore

            self.tokens = TokenStore(self.state)
        self.discovery: Optional[MdnsDiscovery] = None
        self._health = health_aio.HealthServicer()
        self._server: Optional[grpc.aio.Server] = None
        self._stopped = asyncio.Event()
        self.stopping = False

    async def _denied(self, ident, method: str, code: str, reason: str, **details) -> None:
        """A call refused for its certificate or role (gRPC or an HTTP port): counted, and
        audited before the refusal goes out. An HTTP port gives the peer, and for refusals
        it held back over a window their `count` (cluster/http_denials.py)."""
        if self.metrics is not None:
            self.metrics.denied.labels(method, code).inc(details.get("count", 1))
        await self.audit.denied(ident, method, code, reason, **details)

    def _witness(self, audit_log):
        """Nodes keep this chain's signed HEAD, and are checked for a newer one at first contact."""
        if audit_log is None:
            return None
        from cluster.audit.chain import default_key_dir, load_public_key
        from coordinator.audit_witness import AuditWitness

        s = self.settings
        key = load_public_key((s.audit_key_dir or default_key_dir(s.audit_dir)) / "signing.pub")
        return AuditWitness(
            audit_log.directory, key, events=self.events, on_alarm=self._audit_alarm
        )

    def _audit_alarm(self, message: str) -> None:
        """The chain is behind what a node witnessed: stop serving (unless told only to alert)."""
        if not self.settings.audit_witness_refuse:
            return
        log.critical(
            "coordinator=%s stops: its audit chain lacks records a node witnessed (exit %d); "
            "see the AUDIT CHAIN BEHIND A WITNESS line",
            self.settings.coordinator_id,
            EXIT_AUDIT_BEHIND,
        )
        self.exit_code = EXIT_AUDIT_BEHIND
        asyncio.get_running_loop().create_task(self.shutdown())

    def _fleet_changed(self) -> None:
        self.admission.dispatch()
        self.readiness.refresh()

    def _readiness_changed(self, ready: bool, _reason: str) -> None:
        """The Inference service's health follows readiness; "" stays SERVING (liveness)."""
        if self._server is not None and not self.stopping:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            asyncio.get_running_loop().create_task(self._health.set(INFERENCE_SERVICE, status))

    async def start(self) -> int:
        """Bind, serve, and start finding nodes; returns the bound port."""
        s = self.settings
        gate = ReadinessGate(self.readiness, INFERENCE_SERVICE, f"coordinator {s.coordinator_id}")
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[self.authz, gate])
        inference_pb2_grpc.add_InferenceServicer_to_server(self.relay, server)
        fleet_pb2_grpc.add_FleetServicer_to_server(
            FleetAdmin(
                fleet=self.fleet,
                admission=self.admission,
                events=self.events,
                relay=self.relay,
                identify=self.authz.peer,
                audit=self.audit,
                rollouts=self.rollouts,
                settings=s,
                request_log=self.request_log,
                http=lambda: self.http,
                tokens=self.tokens,
                headroom=self.headroom,
                traffic=self.traffic,
            ),
            server,
        )
        shadow_pb2_grpc.add_ShadowServicer_to_server(
            ShadowAdmin(
                shadow=self.shadow, fleet=self.fleet, identify=self.authz.peer, audit=self.audit
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                INFERENCE_SERVICE,
                FLEET_SERVICE,
                SHADOW_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        port = self.security.bind(server, s.listen)
        if not port:
            raise OSError(f"coordinator {s.coordinator_id}: cannot listen on {s.listen}")
        await self._start_http()  # before anything runs: a port clash ends the start cleanly
        await self._start_api()
        await server.start()
        self._server = server
        for service in ("", FLEET_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.readiness.start()  # sets the Inference service's health
        for address in s.nodes:
            self.fleet.add(address, source="static")
        if s.mdns:
            self.discovery = MdnsDiscovery(
                fleet=self.fleet, fleet_name=s.fleet, interface=s.mdns_interface
            )
            try:
                await self.discovery.start()
            except Exception as exc:  # noqa: BLE001 - static nodes still work without multicast
                log.warning(
                    "mDNS discovery unavailable (%s: %s); only --node addresses are used",
                    type(exc).__name__,
                    exc,
                )
                self.discovery = None
        self.rollouts.resume_pending()
        await self.traffic.start()
        await self.shadow.start_sync()  # resumes a run the state database has active
        if s.mdns and s.mdns_announce:
            from coordinator.announce import announce

            self.announcer = announce(s, port, self.api.port if self.api is not None else 0)
        return port

    async def _start_http(self) -> None:
        """/metrics and the dashboard on the monitoring port (docs/monitoring.md)."""
        s = self.settings
        listen = http_address(s.listen, s.http_listen)
        if listen is None:
            return
        from cluster.http_guard import HttpLimits
        from cluster.http_server import DashboardSessions, MonitorHTTP
        from coordinator import dashboard
        from coordinator.session_store import SessionStore

        self.http = MonitorHTTP(
            listen=listen,
            security=self.security,
            table=COORDINATOR_HTTP_TABLE,
            where=f"coordinator {s.coordinator_id}",
            sessions=DashboardSessions(s.dashboard_idle_timeout_s, book=SessionStore(self.state)),
            on_denied=self._denied,
            limits=HttpLimits.of(s),
        )
        if self.metrics is not None:
            from cluster.http_server import metrics_route

            metrics_route(self.http.app, self.metrics.registry)
        dashboard.add_routes(self.http.app, self)
        await self.http.start()

    async def _start_api(self) -> None:
        """The OpenAI-compatible front door (docs/openai-api.md)."""
        s = self.settings
        listen = http_address(s.listen, s.openai_listen, 2)
        if listen is None:
            return
        from cluster.http_guard import HttpLimits
        from coordinator.openai_http import FrontDoor

        self.api = FrontDoor(
            listen=listen,
            security=self.security,
            where=f"coordinator {s.coordinator_id}",
            relay=self.relay,
            fleet=self.fleet,
            tokens=self.tokens,
            default_max_tokens=min(s.openai_default_max_tokens, s.max_tokens_limit),
            max_body=s.openai_max_body_kb * 1024,
            audit=self.audit,
            on_denied=self._denied,
            limits=HttpLimits.of(s),
            responses=self.metrics.api_responses if self.metrics is not None else None,
            readiness=self.readiness,
        )
        try:
            await self.api.start()
        except OSError:
            if self.http is not None:
                await self.http.close()
            raise

    async def shutdown(self, grace_s: Optional[float] = None) -> None:
        """Stop taking requests, let in-flight ones finish within the grace, then stop."""
        if self.stopping:
            if grace_s == 0 and self._server is not None:  # a second signal: cut the grace short
                if self.api is not None:
                    self.api.cancel_all()
                await self._server.stop(0)
            return
        self.stopping = True
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        await self.readiness.close()
        if self.announcer is not None:
            await self.announcer.close()
        log.info(
            "coordinator=%s shutting down: %d requests in flight, grace %.1fs",
            self.settings.coordinator_id,
            self.relay.in_flight,
            grace,
        )
        # Both doors close at once; requests in flight on either finish within the grace.
        await asyncio.gather(
            *([self._server.stop(grace)] if self._server is not None else []),
            *([self.api.close(grace)] if self.api is not None else []),
        )
        await self.shadow.close()  # every request has ended: no copy outlives them
        if self.discovery is not None:
            await self.discovery.close()
        await self.rollouts.close()
        await self.traffic.close()
        await self.fleet.close()
        if self.http is not None:
            await self.http.close()
        if self.tokens is not None:
            self.tokens.close()
        if self.request_log is not None:  # every request has ended: its last rows
            await asyncio.to_thread(self.request_log.close)
        self.state.close()
        if self.audit.log is not None:  # every request has ended: the last records, a checkpoint
            await asyncio.to_thread(self.audit.log.close)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
