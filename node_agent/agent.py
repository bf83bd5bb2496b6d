"""The node agent: one gRPC server, one engine, one lifecycle; run() and shutdown()."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from cluster.api import (
    INFERENCE_SERVICE,
    NODE_SERVICE,
    common_pb2,
    inference_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from cluster.config import NodeSettings
from cluster.daemon import SERVER_OPTIONS
from cluster.mdns import Advert
from cluster.quality import notes
from cluster.security.daemon import DaemonSecurity
from cluster.security.roles import NODE_TABLE
from node_agent.advertiser import Advertiser
from node_agent.engine import Engine, EngineRequest
from node_agent.grammar import Grammars
from node_agent.inference_service import InferenceService
from node_agent.lifecycle import Lifecycle, State
from node_agent.node_service import NodeService
from node_agent.node_state import ModelRef, NodeState
from node_agent.operations import RESTART_EXIT_CODE, Operations
from node_agent.prompts import build_prompt_tokens, model_family
from node_agent.requests import NodeStopping, Outcome, RequestRegistry
from node_agent.sampling import SamplingSpec
from node_agent.serving import Serving
from node_agent.staging import StagingArea
from node_agent.status import build_status
from node_agent.validation import Limits, ValidRequest

log = logging.getLogger(__name__)

WARMUP_TIMEOUT_S = 300.0


def default_node_id(listen: str) -> str:
    """Stable per host and port, without publishing the hostname itself; random for port 0."""
    if listen.endswith(":0"):
        return f"node-{uuid.uuid4().hex[:8]}"
    digest = hashlib.sha256(f"{socket.gethostname()}|{listen}".encode()).hexdigest()
    return f"node-{digest[:8]}"


class NodeAgent:
    """Serves one engine's model; the lifecycle is the source of truth for readiness."""

    def __init__(self, *, settings: NodeSettings, engine: Engine, security: DaemonSecurity):
        self.settings = settings
        self.security = security
        # With TLS the certificate names the node (main checked it matches any --node-id).
        ident = security.identity
        self.node_id = (
            ident.name if ident else (settings.node_id or default_node_id(settings.listen))
        )
        self.engine = engine
        self.lifecycle = Lifecycle(node_id=self.node_id)
        self.registry = RequestRegistry(node_id=self.node_id)
        self.serving = Serving.nothing(settings)  # replaced whole when a model loads
        self.started_at = time.monotonic()
        self.stopping = False
        self.port: Optional[int] = None
        self._server: Optional[grpc.aio.Server] = None
        self.http = None  # the monitoring port (MonitorHTTP), once started
        self._health = health_aio.HealthServicer()
        self._stopped = asyncio.Event()
        self._advertiser: Optional[Advertiser] = None
        self._announcing: Optional[asyncio.Task] = None
        self.exit_code = 0
        self._recovering = False  # LOADING because the engine is restarting its server
        path = settings.model_path.resolve()
        self.configured_model = ModelRef(
            str(path), settings.model_id or path.name, settings.model_version
        )
        self.staging = StagingArea(
            settings.state_dir / "models",
            max_bytes=int(settings.max_staged_gb * 1e9),
            reserve_bytes=int(settings.staging_reserve_gb * 1e9),
        )
        self.ops = Operations(
            node_id=self.node_id,
            state=NodeState.load(settings.state_dir),
            state_dir=settings.state_dir,
            lifecycle=self.lifecycle,
            registry=self.registry,
            staging=self.staging,
            drain_timeout_s=settings.drain_timeout_s,
            configured_model=self.configured_model,
            model_info=lambda: self.serving.model_info,
            enter=self.enter,
            load_and_warm=self.load_and_warm,
            request_restart=self.request_restart,
        )

    @property
    def follower(self) -> bool:
        """A node group's rank other than 0: it serves health and status only."""
        return bool(getattr(self.engine, "follower", False))

    @property
    def cordoned(self) -> bool:
        return self.ops.state.cordoned

    def status(self) -> node_pb2.NodeStatus:
        """The node's whole state now (GetStatus, operation replies, /metrics)."""
        return build_status(
            node_id=self.node_id,
            settings=self.settings,
            lifecycle=self.lifecycle,
            registry=self.registry,
            engine=self.engine,
            serving=self.serving,
            staging=self.staging,
            ops=self.ops,
            started_at=self.started_at,
        )

    def _stopping(self) -> bool:
        return self.stopping

    async def start(self) -> int:
        """Bind and serve status and health at once; returns the bound port."""
        self.registry.bind_loop(asyncio.get_running_loop())
        authz = self.authz = self.security.authorizer(NODE_TABLE, where=f"node {self.node_id}")
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[authz])
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceService(
                node_id=self.node_id,
                settings=self.settings,
                engine=self.engine,
                registry=self.registry,
                lifecycle=self.lifecycle,
                node_state=self.ops.state,
                serving=lambda: self.serving,
                stopping=self._stopping,
                engine_died=self.engine_died,
            ),
            server,
        )
        node_pb2_grpc.add_NodeServicer_to_server(
            NodeService(
                node_id=self.node_id,
                ops=self.ops,
                staging=self.staging,
                status=self.status,
                stopping=self._stopping,
                authz=authz,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                INFERENCE_SERVICE,
                NODE_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = self.security.bind(server, self.settings.listen)
        if not self.port:
            raise OSError(f"node {self.node_id}: cannot listen on {self.settings.listen}")
        await self._start_http()  # before anything runs: a port clash ends the start cleanly
        await self._set_health(State.STARTING)
        await server.start()
        self._server = server
        loop = asyncio.get_running_loop()
        self.engine.start(
            self.registry.emit_threadsafe,
            on_exit=lambda reason: loop.call_soon_threadsafe(
                lambda: loop.create_task(self.engine_died(reason))
            ),
            on_serving=lambda up, reason: loop.call_soon_threadsafe(
                lambda: loop.create_task(self.engine_serving(up, reason))
            ),
        )
        if hasattr(self.engine, "share_stage"):  # a node group stages on every rank
            from node_agent.group_ops import wire_group_staging

            wire_group_staging(self.engine, self.ops, self.staging, loop)
        # In the background: mDNS probing takes ~1 s, loading need not wait. In a node group
        # only rank 0 announces: the group is one node.
        if self.settings.mdns and not self.follower:
            self._announcing = loop.create_task(self._announce())
        return self.port

    async def _start_http(self) -> None:
        """/metrics on the monitoring port (docs/monitoring.md), same certificates and roles."""
        from cluster.config import http_address

        listen = http_address(self.settings.listen, self.settings.http_listen)
        if listen is None:
            return
        from cluster.http_guard import HttpLimits
        from cluster.http_server import MonitorHTTP, metrics_route
        from cluster.security.roles import NODE_HTTP_TABLE

        self.http = MonitorHTTP(
            listen=listen,
            security=self.security,
            table=NODE_HTTP_TABLE,
            where=f"node {self.node_id}",
            limits=HttpLimits.of(self.settings),
        )
        if self.settings.metrics:
            from node_agent.metrics import NodeMetrics

            metrics = NodeMetrics(
                node_id=self.node_id,
                request_registry=self.registry,
                status=self.status,
                engine=self.settings.engine,
            )
            metrics_route(self.http.app, metrics.registry)
        await self.http.start()

    def advert(self) -> Advert:
        """The mDNS summary of this node's state (the whole is in GetStatus)."""
        info = self.serving.model_info
        return Advert(
            node_id=self.node_id,
            engine=info.engine or self.settings.engine,
            model_id=info.model_id,
            digest=info.weights_digest[:19],
            state=self.lifecycle.state.value,
            fleet=self.settings.fleet,
            group_size=len(self.settings.group),
            group_mode=self.settings.group_mode if self.settings.group else "",
            group_backend=self.settings.group_backend if self.settings.group else "",
        )

    async def _announce(self) -> None:
        host = self.settings.listen.rpartition(":")[0].strip("[]")
        self._advertiser = Advertiser(host=host, port=self.port)
        try:
            await self._advertiser.start(self.advert())
        except Exception as exc:  # noqa: BLE001 - no multicast here: static node lists still work
            log.warning(
                "node=%s mDNS announcement failed (%s: %s); coordinators need it in --node",
                self.node_id,
                type(exc).__name__,
                exc,
            )
            return
        loop = asyncio.get_running_loop()
        self.lifecycle.subscribe(
            lambda _snap: loop.call_soon_threadsafe(lambda: loop.create_task(self._readvertise()))
        )

    async def _readvertise(self) -> None:
        """Best effort: a failed TXT update is logged; coordinators read GetStatus anyway."""
        if self._advertiser is None:
            return
        try:
            await self._advertiser.update(self.advert())
        except Exception as exc:  # noqa: BLE001
            log.warning("node=%s mDNS update failed: %s: %s", self.node_id, type(exc).__name__, exc)

    async def come_up(self) -> bool:
        """Load the model this node was last told to serve (its activated one, else --model),
        then restore a drain that was in place before the agent restarted."""
        ops = self.ops
        model = ops.state.model_to_serve(self.configured_model)
        await ops.save()
        if model is not self.configured_model:
            log.info(
                "node=%s serving activated model %s %s (not --model)",
                self.node_id,
                model.model_id,
                model.digest[:19],
            )
        return await self.load_and_warm(model, drained=ops.state.drained)

    async def load_and_warm(
        self, model: Optional[ModelRef] = None, *, drained: bool = False
    ) -> bool:
        """LOADING -> WARMING -> READY, or FAILED with the reason; never raises. A model with
        a digest must hash to it: a mismatch is a failure, never a swap."""
        model = model or self.configured_model
        self._recovering = False  # a load replaces whatever the engine was restarting
        await self.enter(State.LOADING, f"loading {model.model_id} from {model.path}")
        try:
            facts = await asyncio.to_thread(self.engine.load, Path(model.path), model.model_id)
            # A node group reports the model's digest with its layout; staged by the model's.
            digests = (facts.weights_digest, getattr(self.engine, "model_digest", ""))
            if model.digest and model.digest not in digests:
                raise ValueError(
                    f"weights digest {facts.weights_digest[:19]} is not the expected {model.digest[:19]}"
                )
        except Exception as exc:  # noqa: BLE001 - reported through the lifecycle
            log.exception("node=%s model load failed", self.node_id)
            await self.enter(State.FAILED, f"model load failed: {type(exc).__name__}: {exc}")
            return False
        if self.stopping:  # SIGTERM arrived while loading: do not come up
            return False
        tokenizer = self.engine.tokenizer
        self.serving = Serving(
            facts=facts,
            limits=Limits(
                self.settings.max_tokens_limit,
                facts.context_length,
                facts.decodable_vocab_size,
                self.settings.max_stop_sequences,
            ),
            model_info=common_pb2.ModelInfo(
                model_id=facts.model_id,
                version=model.version,
                weights_digest=facts.weights_digest,
                context_length=facts.context_length,
                engine=facts.engine,
                engine_version=facts.engine_version,
                vocab_size=facts.vocab_size,
                family=model_family(Path(model.path)),
                parameters=facts.parameters,
                quantization=facts.quantization,
            ),
            tokenizer=tokenizer,
            grammars=Grammars(
                tokenizer, vocab_size=facts.vocab_size, eos_token_ids=facts.eos_token_ids
            ),
        )
        if self.follower:  # rank 0's canary runs through every rank (token parity)
            rank = f"rank {self.settings.rank} of the node group"
            await self.enter(State.WARMING, f"{rank}: shard loaded")
            await self.enter(State.READY, f"{rank}: shard loaded; rank 0 serves requests")
            return True
        if not await self._warm(
            f"warming up {facts.model_id} {facts.weights_digest[:19]}", "warm-up generation"
        ):
            return False
        if self.stopping:
            return False
        if drained:
            await self.enter(
                State.DRAINED,
                "model loaded and warmed up; drained before the agent restarted, uncordon to serve",
            )
        else:
            await self.enter(State.READY, "model loaded and warmed up")
        return True

    async def _warm(self, reason: str, what: str) -> bool:
        """WARMING, then the canary; FAILED with the cause if it fails."""
        await self.enter(State.WARMING, reason)
        try:
            await self._warm_up()
        except Exception as exc:  # noqa: BLE001 - reported through the lifecycle
            log.exception("node=%s %s failed", self.node_id, what)
            await self.enter(State.FAILED, f"{what} failed: {type(exc).__name__}: {exc}")
            return False
        return True

    async def _warm_up(self) -> None:
        """A real chat generation through the whole request path, as a canary."""
        req = ValidRequest(
            request_id="warmup",
            messages=(("user", "Warm-up: write one word."),),
            prompt=None,
            sampling=SamplingSpec(),
            seed_given=True,
            max_tokens=self.settings.warmup_tokens,
            stop=(),
            prefix_token_ids=(),
            require_weights_digest="",
        )
        serving = self.serving
        if not self.engine.server_enforces_schema:
            # Build the schema tokenizer now (~1 s for a large vocabulary), not on the first note.
            await asyncio.to_thread(serving.grammars.matcher, notes.template_spec("soap-brief"))
        tokens = build_prompt_tokens(serving.tokenizer, req)
        stream = self.registry.open(
            req,
            prompt_len=len(tokens),
            detokenizer=serving.tokenizer.detokenizer,
            eos_token_ids=serving.facts.eos_token_ids,
            internal=True,
        )
        outcome = Outcome.FAILED
        try:
            self.engine.submit(
                EngineRequest(
                    stream.key, tokens, 0, req.max_tokens, req.sampling, messages=req.messages
                )
            )
            while stream.finish is None:
                await asyncio.wait_for(stream.next_chunk(), timeout=WARMUP_TIMEOUT_S)
            outcome = Outcome.COMPLETED
        finally:
            if outcome is not Outcome.COMPLETED:
                self.engine.cancel(stream.key)
            self.registry.close(stream, outcome)

    async def engine_died(self, reason: str) -> None:
        """The engine thread is gone: the node can no longer serve until restarted."""
        if self.lifecycle.state is not State.FAILED:
            log.error("node=%s engine stopped: %s", self.node_id, reason)
            await self.enter(State.FAILED, f"engine stopped: {reason}; restart the node agent")

    async def engine_serving(self, up: bool, reason: str) -> None:
        """The engine's server went down (its requests have failed) or serves again (vLLM
        restarts its child by itself). Down: READY or DRAINED -> LOADING with the cause;
        a drain under way ends by itself. Up: warm up again, then READY, or DRAINED if the
        node was drained."""
        state = self.lifecycle.state
        if self.stopping:
            return
        if not up:
            log.error("node=%s engine server down: %s", self.node_id, reason)
            if state in (State.READY, State.DRAINED) or (
                state is State.LOADING and self._recovering
            ):
                self._recovering = True
                await self.enter(State.LOADING, reason)
            elif state is State.LOADING:  # still loading (an upstream not reached yet): say why
                await self.enter(State.LOADING, reason)
            return
        log.info("node=%s %s", self.node_id, reason)
        if not (self._recovering and state is State.LOADING):
            return
        self._recovering = False
        if not await self._warm(f"{reason}; warming up", "warm-up after the engine restart"):
            return
        if self.lifecycle.state is State.WARMING and not self.stopping:
            drained = self.ops.state.drained
            await self.enter(
                State.DRAINED if drained else State.READY,
                f"{reason}; warmed up" + ("; drained, uncordon to serve" if drained else ""),
            )

    async def enter(self, state: State, reason: str) -> None:
        self.lifecycle.transition(state, reason)
        await self._set_health(state)

    async def _set_health(self, state: State) -> None:
        serving = state is State.READY and not self.stopping and not self.follower
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", INFERENCE_SERVICE):
            await self._health.set(service, status)

    async def shutdown(self, grace_s: Optional[float] = None) -> None:
        """Stop accepting, let in-flight requests finish within the grace, end the rest."""
        if self.stopping:
            return
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.stopping = True
        await self._health.enter_graceful_shutdown()
        if self._announcing is not None:
            self._announcing.cancel()
        if self._advertiser is not None:
            await self._advertiser.close()  # goodbye: coordinators stop sending new work
            self._advertiser = None
        draining = self.lifecycle.state is State.READY
        if draining:
            self.lifecycle.transition(State.DRAINING, "shutting down (SIGTERM)")
        n = len(self.registry)
        log.info(
            "node=%s shutting down: %d requests in flight, grace %.1fs", self.node_id, n, grace
        )
        try:
            await asyncio.wait_for(self.registry.wait_idle(), timeout=grace)
        except TimeoutError:
            ended = self.registry.abort_all(
                lambda s: NodeStopping(f"shutdown grace period of {grace:g}s expired")
            )
            log.warning("node=%s grace expired; ending %d requests", self.node_id, ended)
            try:
                await asyncio.wait_for(self.registry.wait_idle(), timeout=5)
            except TimeoutError:
                log.error("node=%s %d requests did not end", self.node_id, len(self.registry))
        if draining:
            self.lifecycle.transition(State.DRAINED, "shut down; no requests in flight")
        if self._server is not None:
            await self._server.stop(1.0)
        await asyncio.to_thread(self.engine.close)
        if self.http is not None:
            await self.http.close()
        self._stopped.set()
        log.info("node=%s stopped", self.node_id)

    def request_restart(self) -> None:
        """Stop (the node is drained) and exit with RESTART_EXIT_CODE for the service manager."""
        self.exit_code = RESTART_EXIT_CODE
        log.info(
            "node=%s restarting: exiting with %d for the service manager",
            self.node_id,
            RESTART_EXIT_CODE,
        )
        asyncio.get_running_loop().create_task(self.shutdown(grace_s=0))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
