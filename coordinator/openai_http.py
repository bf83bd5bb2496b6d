"""The OpenAI-compatible front door (docs/openai-api.md): `POST
/v1/chat/completions`, `POST /v1/completions` and `GET /v1/models` on a port of the
coordinator's own, so an application written for a hosted API moves here by changing its
base URL.

Every request goes through the relay exactly as a gRPC Generate does (the same
admission, routing, failover, audit record, metrics, request log and quality checks):
`HttpCall` stands in for the gRPC context and turns the relay's status into an answer in
OpenAI's error format. A stream's headers wait for its first token, so a refusal before
it (queue full, no node) still gets its own HTTP status; one after it ends the stream
with an `error` event, which the SDKs raise. A client that disconnects cancels its
handler, and with it the node's generation.

Access (TLS with the coordinator's certificate, re-read on rotation): a bearer token from
`fleetctl tokens issue` (coordinator/api_tokens.py) or an app client certificate. In
plaintext development there are no roles, as on the gRPC port.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, NoReturn, Optional

import grpc
from aiohttp import web

from cluster.http_server import SECURITY_HEADERS, MonitorHTTP
from cluster.security.identity import DEVELOPER, Identity, Role
from cluster.security.roles import COORDINATOR_API_TABLE
from cluster.validation import MAX_REQUEST_ID_LEN, new_request_id, serves, valid_id
from coordinator import openai_protocol as oa
from coordinator.api_tokens import TokenRefused, TokenStore
from coordinator.call_context import PUSHBACK_KEY
from coordinator.request_summary import Outcome

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


@dataclass(frozen=True)
class _Endpoint:
    """What differs between the two completion endpoints: parsing, answer and chunk shapes."""

    parse: Callable
    answer: Callable
    chunk: Callable
    chunk_object: str
    id_prefix: str


CHAT = _Endpoint(
    oa.chat_request, oa.chat_answer, oa.chat_chunk, "chat.completion.chunk", "chatcmpl-"
)
COMPLETION = _Endpoint(
    oa.completion_request, oa.completion_answer, oa.completion_chunk, "text_completion", "cmpl-"
)


class HttpCall:
    """A request that came over HTTP, as the relay's CallContext (coordinator/call_context.py):
    its peer, and abort(), which records the status and ends the relay's run as grpc's does
    (AbortError)."""

    def __init__(self, peer: str):
        self._peer = peer
        self._code: Optional[grpc.StatusCode] = None
        self.details = ""
        self.trailers: tuple = ()

    def peer(self) -> str:
        return self._peer

    def code(self) -> Optional[grpc.StatusCode]:
        return self._code

    def time_remaining(self) -> Optional[float]:
        return None  # no deadline: the client's timeout ends the connection, which cancels

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata=()
    ) -> NoReturn:
        self._code, self.details, self.trailers = code, details, tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def error(self) -> oa.ApiError:
        pushback = dict(self.trailers).get(PUSHBACK_KEY)
        exc = oa.from_status(self._code, self.details, int(pushback) if pushback else None)
        exc.relayed = True  # the relay audited and counted it
        return exc


class FrontDoor(MonitorHTTP):
    what, flag = "OpenAI API", "--openai-listen"
    cancel_on_disconnect = True

    def __init__(
        self,
        *,
        listen: str,
        security,
        where: str,
        relay,
        fleet,
        tokens: Optional[TokenStore],
        default_max_tokens: int,
        max_body: int,
        audit,
        on_denied=None,
        responses=None,
        limits=None,
        readiness=None,
    ):
        super().__init__(
            listen=listen,
            security=security,
            table=COORDINATOR_API_TABLE,
            where=where,
            on_denied=on_denied,
            max_body=max_body,
            **({"limits": limits} if limits else {}),
        )
        self._relay, self._fleet, self._tokens = relay, fleet, tokens
        self._audit = audit  # AuditTrail: the record of a request refused before the relay
        self._default_max_tokens = default_max_tokens
        self._max_body = max_body
        self._responses = responses  # a Counter by endpoint and status, or None
        self._readiness = (
            readiness  # coordinator/readiness.py: GET /ready, and no new work without the database
        )
        self._created = int(time.time())
        self._running: set = set()  # requests in flight (their handler tasks)
        self._idle: Optional[asyncio.Event] = None  # set once closing and none is left
        r = self.app.router
        r.add_post("/v1/chat/completions", lambda request: self._generate(request, CHAT))
        r.add_post("/v1/completions", lambda request: self._generate(request, COMPLETION))
        r.add_get("/v1/models", self._list_models)
        r.add_get("/v1/models/{model:.+}", self._get_model)
        r.add_get("/ready", self._ready)

    def serves(self) -> str:
        return "/v1/chat/completions, /v1/completions, /v1/models"

    # -- access and errors -------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler):
        entry = self._allowed(request.path)[0]
        task = asyncio.current_task()
        self._running.add(task)
        try:
            response = await self._answer(request, handler, entry)
        finally:
            self._running.discard(task)
            if not self._running and self._idle is not None:
                self._idle.set()
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
            if request.get("rid"):
                response.headers["X-Request-Id"] = request["rid"]
        if self._responses is not None:
            self._responses.labels(entry, str(response.status)).inc()
        return response

    async def _answer(self, request: web.Request, handler, entry: str) -> web.StreamResponse:
        try:
            if (
                request.path == "/ready" and request.method == "GET"
            ):  # a load balancer's check: no credentials
                return self._ready()
            if self._idle is not None:
                raise oa.ApiError(
                    503,
                    f"{self._where} is shutting down; retry (another coordinator, or this one "
                    "once it is back)",
                    type_="service_unavailable",
                    code="shutting_down",
                    headers={"Connection": "close"},
                )
            if self._readiness is not None and not self._readiness.state_up and entry != "other":
                raise oa.ApiError(
                    503,
                    f"{self._where} cannot reach its state database; retry another coordinator "
                    "(or this one once it is back)",
                    type_="service_unavailable",
                    code="state_store_unreachable",
                )
            request["caller"], request["token"] = await self._authenticate(request, entry)
            return await handler(request)
        except oa.ApiError as exc:
            await self._rejected(request, exc)
            return _error_response(exc)
        except web.HTTPRequestEntityTooLarge:
            exc = oa.ApiError(
                413,
                f"the request body is larger than this coordinator's limit of {self._max_body} "
                "bytes (--openai-max-body-kb); shorten the prompt",
                code="request_too_large",
            )
            await self._rejected(request, exc)
            return _error_response(exc)
        except web.HTTPException as exc:  # the router's 404 and 405
            what = (
                "no such endpoint" if exc.status == 404 else f"{request.method} is not allowed here"
            )
            return _error_response(
                oa.ApiError(
                    exc.status,
                    f"{what}: this front door serves {self.serves()}",
                    type_="not_found_error" if exc.status == 404 else "invalid_request_error",
                    code="unknown_url",
                )
            )
        except ConnectionResetError:  # the client left mid-answer: nobody to tell
            raise
        except Exception as exc:  # noqa: BLE001 - never a traceback or an exception's text (it may quote content)
            log.error("front door %s: internal error %s", entry, type(exc).__name__)
            return _error_response(
                oa.ApiError(
                    500,
                    "the coordinator hit an internal error; retry, and report it with the coordinator's log",
                    type_="server_error",
                    code="internal",
                )
            )

    async def _rejected(self, request: web.Request, exc: oa.ApiError) -> None:
        """A completion request refused here, before the relay (its body, its model): one
        audit record and one summary, as the relay keeps for a request it rejects."""
        if exc.relayed or "rid" not in request or "caller" not in request:
            return  # the relay's own answer (recorded there), or a refusal audited as denied
        record = self._audit.request_record(
            request["caller"], self._peer(request), request_id=request["rid"]
        ).ended(
            Outcome.REJECTED,
            oa.CODE_OF.get(exc.status, "INVALID_ARGUMENT"),
            reason=exc.message[:300],
        )
        await self._relay.refused(record, None, str(request["caller"]), request["started"])

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop accepting (new requests on open connections get 503), give the requests in
        flight `grace_s` to finish, as gRPC's stop(grace) does, then cancel the rest."""
        self._idle = asyncio.Event()
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
        if self._running and grace_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        self.cancel_all()
        await super().close(0.5)

    def cancel_all(self) -> None:
        """Cancel every request in flight (a second stop signal): each ends as cancelled."""
        for task in list(self._running):
            task.cancel()

    async def _authenticate(self, request: web.Request, entry: str) -> tuple[Identity, str]:
        """(the caller, its token id or ""); ApiError 401/403 otherwise, audited."""
        if self._security.plaintext:
            return DEVELOPER, ""
        # An unknown path is the router's 404 for any authenticated caller.
        allowed = self._allowed(request.path)[1] if entry != "other" else frozenset(Role)
        header = request.headers.get("Authorization", "")
        ident, token_id, refusal = None, "", None
        if header:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                refusal = (401, "the Authorization header must be 'Bearer <token>'")
            elif self._tokens is None:
                refusal = (
                    401,
                    "this coordinator has no token store; use an app client certificate",
                )
            else:
                try:
                    holder = await asyncio.to_thread(
                        self._tokens.verify, value.strip()
                    )  # a database read
                    ident, token_id = holder.identity, holder.id
                except TokenRefused as exc:
                    refusal = (401, str(exc))
        else:
            ident = self._certificate(request)
            if ident is None:
                refusal = (
                    401,
                    f"{self._where} requires an API key (Authorization: Bearer sft_...; an operator "
                    "issues one with `fleetctl tokens issue NAME`) or an app client certificate",
                )
        if refusal is None:
            refusal = self._check(ident, allowed, entry)
        if refusal is None:
            self.connections.authenticated(request)
            return ident, token_id
        status, message, headers = self._limited(request, refusal)
        await self._denied(request, ident, entry, status, message)
        if status == 429:
            raise oa.ApiError(
                429, message, type_="rate_limit_error", code="rate_limit_exceeded", headers=headers
            )
        raise oa.ApiError(
            status,
            message,
            type_="authentication_error" if status == 401 else "permission_error",
            code="invalid_api_key" if status == 401 else "permission_denied",
            headers={"WWW-Authenticate": 'Bearer realm="studiofleet"'} if status == 401 else None,
        )

    def _ready(self, _request: Optional[web.Request] = None) -> web.Response:
        """200 when this coordinator takes new requests, else 503; a reason word and nothing more."""
        reason = (
            "shutting_down"
            if self._idle is not None
            else self._readiness.reason
            if self._readiness
            else "ready"
        )
        return web.json_response(
            {"ready": reason == "ready", "reason": reason},
            status=200 if reason == "ready" else 503,
            headers={"Cache-Control": "no-store"},
        )

    def _peer(self, request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        where = f"http:{peer[0]}:{peer[1]}" if peer else "http:-"
        return f"{where} token={request['token']}" if request["token"] else where

    # -- models -----------------------------------------------------------------------------
    def _models(self) -> dict[str, dict]:
        """The model ids the fleet's verified nodes serve, with how many are READY."""
        out: dict[str, dict] = {}
        for e in self._fleet.entries.values():
            if e.status is None or not e.node_id:
                continue
            m = e.status.model
            seen = out.setdefault(
                m.model_id,
                {
                    "id": m.model_id,
                    "object": "model",
                    "created": self._created,
                    "owned_by": "studiofleet",
                    "studiofleet": {
                        "nodes": 0,
                        "ready": 0,
                        "versions": [],
                        "context_length": m.context_length,
                    },
                },
            )
            facts = seen["studiofleet"]
            facts["nodes"] += 1
            facts["ready"] += int(e.routable)
            if m.version and m.version not in facts["versions"]:
                facts["versions"].append(m.version)
        return out

    def _known(self, wanted: str) -> bool:
        """A verified node serves `wanted`: a model id, or ID@VERSION pinned to one version."""
        return any(
            serves(e.status.model.model_id, e.status.model.version, wanted)
            for e in self._fleet.entries.values()
            if e.status is not None and e.node_id and wanted
        )

    async def _list_models(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": sorted(self._models().values(), key=lambda m: m["id"])}
        )

    async def _get_model(self, request: web.Request) -> web.Response:
        wanted = request.match_info["model"]
        model = self._models().get(wanted.partition("@")[0]) if self._known(wanted) else None
        if model is None:
            raise _unknown_model(wanted)
        return web.json_response(model)

    # -- completions -----------------------------------------------------------------------
    async def _generate(self, request: web.Request, kind: _Endpoint) -> web.StreamResponse:
        # An id is checked before any use; an invalid one is never echoed (its refusal is
        # recorded, logged and answered under a new id).
        raw = request.headers.get("X-Request-Id", "")
        request["started"] = time.time()
        request["rid"] = rid = raw if raw and valid_id(raw) else new_request_id()
        if raw and rid != raw:
            raise oa.bad(
                f"the X-Request-Id header must be 1-{MAX_REQUEST_ID_LEN} characters from A-Z a-z 0-9 "
                f". _ : @ / + -; this refusal is recorded as request {rid}",
                param="X-Request-Id",
                code="invalid_request_id",
            )
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                data = await request.read()
        except TimeoutError:
            raise oa.ApiError(
                408,
                f"the request body did not arrive within {self.limits.body_timeout_s:g} s "
                "(--http-body-timeout-s); send it at once",
                code="body_timeout",
                headers={"Connection": "close"},
            ) from None
        body = oa.parse_json(data)
        parsed = kind.parse(body, default_max_tokens=self._default_max_tokens)
        if not self._known(parsed.model):
            raise _unknown_model(parsed.model)
        parsed.request.request_id = rid
        call = HttpCall(self._peer(request))
        ids = kind.id_prefix + rid, int(time.time()), parsed.model
        async with contextlib.aclosing(
            self._relay.Generate(parsed.request, call, identity=request["caller"])
        ) as chunks:
            if parsed.stream:
                return await self._stream(request, kind, parsed, call, chunks, ids)
            text: list[str] = []
            final = None
            try:
                async for (
                    chunk
                ) in chunks:  # to its end: the relay records the outcome after the final chunk
                    text.append(chunk.text)
                    if chunk.HasField("final"):
                        final = chunk.final
            except grpc.aio.AbortError:
                raise call.error() from None
        if final is None:  # the relay ends every request with a final chunk or a status
            raise call.error()
        return web.json_response(kind.answer(*ids, "".join(text), final))

    async def _stream(
        self,
        request: web.Request,
        kind: _Endpoint,
        parsed: oa.Parsed,
        call: HttpCall,
        chunks: AsyncIterator,
        ids: tuple,
    ) -> web.StreamResponse:
        """Headers after the first chunk (a refusal before it is its own HTTP status); then
        one `data:` event per text delta, the finish, the usage if asked, `[DONE]`."""
        try:
            first = await anext(chunks)
        except grpc.aio.AbortError:
            raise call.error() from None
        response = web.StreamResponse(
            headers={**SSE_HEADERS, **SECURITY_HEADERS, "X-Request-Id": request["rid"]}
        )
        await response.prepare(request)

        async def send(obj) -> None:
            await response.write(
                b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
            )

        piece = functools.partial(kind.chunk, *ids, with_usage=parsed.include_usage)
        try:
            if kind is CHAT:
                await send(piece(text="", first=True))
            chunk = first
            while chunk is not None:
                final = chunk.final if chunk.HasField("final") else None
                if chunk.text:
                    await send(piece(text=chunk.text))
                if final is not None:
                    await send(piece(final=final))
                    if parsed.include_usage:
                        await send(oa.usage_chunk(kind.chunk_object, *ids, final))
                chunk = await anext(
                    chunks, None
                )  # to its end: the relay records the outcome after the final
        except grpc.aio.AbortError:  # after the first token: the stream ends with the error
            await send(call.error().body())
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the status line is gone: end the stream with the error
            log.error(
                "front door: request %s failed mid-stream: %s", request["rid"], type(exc).__name__
            )
            await send(
                oa.ApiError(
                    500,
                    f"request {request['rid']}: the coordinator hit an internal error; retry, "
                    "and report it with the coordinator's log",
                    type_="server_error",
                    code="internal",
                ).body()
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _unknown_model(_model: str) -> oa.ApiError:
    """Never echoes the name: it is the caller's text (and lands in the audit record's reason)."""
    return oa.ApiError(
        404,
        "The model asked for does not exist in this fleet; GET /v1/models lists the models "
        "its nodes serve",
        param="model",
        code="model_not_found",
    )


def _error_response(exc: oa.ApiError) -> web.Response:
    response = web.json_response(exc.body(), status=exc.status)
    response.headers.update(exc.headers)
    return response
