"""The upstream engine: a remote OpenAI-compatible endpoint as a fleet node.

Two kinds. `vllm`: the same client as the vLLM engine (vllm_protocol.py: streaming
/v1/completions with the prompt as token ids and `return_token_ids`, so a resume is exact)
without supervising a server. `openai`: a hosted API, chat messages in and text out
(upstream_openai.py), never part of an exact resume. The endpoint is remote (http or
https, the system's or a given CA), reached with a bearer key read from a file. The agent
keeps everything else (validation, templates, tokens, stops, admission, audit, drain), so
--model still names a local directory with config.json and the tokenizer; the weights may
be absent there.

At start the endpoint must answer GET /v1/models listing the served model (and, for the
vllm kind, pass the token check of upstream_check.py); until it does, the engine keeps trying
with backoff and tells the agent why (the node stays LOADING with that reason). Upstream
errors fail the request with a message that says what happened and never holds the key,
the prompt or the endpoint's error text (it may quote the input).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import time
from pathlib import Path
from typing import Optional

from cluster.digest import weights_digest
from node_agent.engine import (
    EngineEvent,
    EngineRequest,
    EngineStats,
    EventKind,
    ModelFacts,
    ServerInfo,
    quantization_of,
    stored_parameters,
)
from node_agent.engines.loop_engine import LoopEngine
from node_agent.engines.upstream_check import CHECK_TEXT, token_check
from node_agent.engines.upstream_openai import (
    TextReader,
    TextTokens,
    codec,
    refusal,
    remote_digest,
    request_body,
)
from node_agent.engines.upstream_reference import weights_reference
from node_agent.engines.vllm_protocol import (
    KEEPALIVE_S,
    chunk_events,
    completion_body,
    error_type,
    post_once_more,
    stream_messages,
)

log = logging.getLogger(__name__)

KEY_FLAG = "--upstream-key-file"
KINDS = ("vllm", "openai")
_RATE_WINDOW_S = 10.0


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the flag and the file, never the key."""


def read_key(path: Optional[Path]) -> str:
    if path is None:
        raise KeyFileError(
            f"{KEY_FLAG} is required with --engine upstream: a file holding the endpoint's key"
        )
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise KeyFileError(
            f"{KEY_FLAG} {path} cannot be read ({type(exc).__name__}); "
            "point it at a readable file holding the endpoint's key"
        ) from None
    if not key:
        raise KeyFileError(f"{KEY_FLAG} {path} is empty; write the endpoint's key into it")
    if any(c.isspace() for c in key):
        raise KeyFileError(
            f"{KEY_FLAG} {path} holds more than one word; it must hold the key alone"
        )
    return key


def retry_after_s(value: Optional[str]) -> Optional[float]:
    """Retry-After in seconds (the delta-seconds form; an HTTP date is not trusted)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def retry_hint_s(headers) -> Optional[float]:
    """The endpoint's retry hint: `retry-after-ms` (OpenAI's and our front door's, finer)
    when it sends one, else `Retry-After`."""
    ms = retry_after_s(headers.get("retry-after-ms"))
    return ms / 1000.0 if ms is not None else retry_after_s(headers.get("Retry-After"))


def http_failure(status: int, body: bytes, key_file: Path, retry_after: Optional[float]) -> str:
    """What an upstream refusal means for the request, as one line (no key, no body text)."""
    if status == 429:
        hint = f"; retry after {retry_after:g}s" if retry_after is not None else "; retry later"
        return f"the upstream endpoint is rate-limiting (HTTP 429){hint}"
    if status in (401, 403):
        return (
            f"the upstream endpoint refused the key in {key_file} (HTTP {status}); "
            f"put a valid key in that file ({KEY_FLAG})"
        )
    if status >= 500:
        return (
            f"the upstream endpoint failed (HTTP {status}{error_type(body)}); retry on another node"
        )
    return f"the upstream endpoint refused the request (HTTP {status}{error_type(body)})"


def http_status(status: int) -> str:
    """The gRPC status a request refused by the upstream ends with (nothing streamed yet)."""
    if status == 429:
        return "RESOURCE_EXHAUSTED"
    if status in (401, 403):
        return "FAILED_PRECONDITION"
    return "UNAVAILABLE" if status >= 500 else ""


class UpstreamEngine(LoopEngine):
    """Engine over a remote vLLM OpenAI endpoint; construct, `start(emit)`, then `load()`."""

    name = "upstream"
    what = "upstream engine"
    server_enforces_schema = True

    def __init__(
        self,
        *,
        model_path: Path,
        model_id: Optional[str] = None,
        max_running: int = 32,
        max_context_tokens: Optional[int] = None,
        url: str,
        served_model: str,
        key_file: Path,
        kind: str = "vllm",
        digest: str = "",
        weights_check: str = "auto",
        ca_file: Optional[Path] = None,
        max_backoff_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 120.0,
    ):
        if kind not in KINDS:
            raise ValueError(f"upstream kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
        self._kind = kind
        self._path = Path(model_path)
        self._model_id = model_id or self._path.name
        self._init_loop(max_running)
        self._max_context = max_context_tokens
        self._url = url.rstrip("/")
        self._served_model = served_model
        self._key_file = Path(key_file)
        self._digest = digest
        self._weights_check = weights_check
        self._reference: Optional[list[int]] = None  # the weights' own greedy check tokens
        self._ca_file = ca_file
        self._max_backoff = max_backoff_s
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._key = ""
        self._key_stale = False  # the endpoint refused the key: read the file again
        self._loading: Optional[asyncio.Task] = None
        self._up_since = 0.0
        self._last_error = ""  # the last request the endpoint failed or refused, as one line
        self._rate: collections.deque[float] = collections.deque()  # token arrival times
        self._encode = self._decode = self._spans = None  # the local tokenizer's

    # -- called from other threads -------------------------------------------------

    def load(self, model_path: Optional[Path] = None, model_id: Optional[str] = None) -> ModelFacts:
        """Read the local model's tokenizer and config, then wait (retrying with backoff)
        until the endpoint serves the model. The agent calls it with nothing in flight."""
        if model_path is not None:
            self._path = Path(model_path)
            self._model_id = model_id or self._path.name
        return self._call(self._load_task()).result()

    def stats(self) -> EngineStats:
        now = time.monotonic()
        times = [t for t in list(self._rate) if now - t <= _RATE_WINDOW_S]
        rate = len(times) / _RATE_WINDOW_S if times else 0.0
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting),
            decode_tokens_per_s=rate,
            server=ServerInfo(
                pid=0,
                url=self._url,
                restarts=0,
                last_exit=self._last_error,
                up_s=now - self._up_since if self._serving else 0.0,
            ),
        )

    # -- engine thread ---------------------------------------------------------------

    async def _open(self) -> None:
        import aiohttp

        tls = None
        if self._url.startswith("https://"):
            tls = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, ssl=tls if tls is not None else True, keepalive_timeout=KEEPALIVE_S
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
            ),
        )

    async def _load_task(self) -> ModelFacts:
        # A task of its own, so that close() can end a load still waiting for the endpoint.
        self._loading = asyncio.current_task()
        try:
            return await self._load()
        finally:
            self._loading = None

    async def _load(self) -> ModelFacts:
        from mlx_lm.utils import load_tokenizer

        path = self._path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json; point --model at a directory with the "
                "served model's config.json and tokenizer"
            )
        config = json.loads((path / "config.json").read_text())
        self._serving = False
        self._fail_all("the model was replaced")
        tokenizer = await asyncio.to_thread(
            load_tokenizer, path, eos_token_ids=config.get("eos_token_id")
        )
        if self._kind == "openai":
            digest = remote_digest(self._url, self._served_model)
        else:
            digest = self._digest or await asyncio.to_thread(weights_digest, path)
        parameters = await asyncio.to_thread(stored_parameters, path)
        context = int(config.get("max_position_embeddings") or 32768)
        if self._max_context:
            context = min(context, self._max_context)
        vocab = int(config.get("vocab_size") or len(tokenizer.vocab))
        self._tokenizer, self._eos = tokenizer, tuple(sorted(tokenizer.eos_token_ids))
        self._encode, self._decode, self._spans = codec(tokenizer)
        checked, self._reference = "", None
        if self._kind == "vllm":
            self._reference, checked = await weights_reference(
                path, digest, self._encode(CHECK_TEXT), enabled=self._weights_check != "off"
            )
        version = await self._reach()
        self._serving, self._up_since = True, time.monotonic()
        return ModelFacts(
            model_id=self._model_id,
            weights_digest=digest,
            context_length=context,
            vocab_size=vocab,
            decodable_vocab_size=min(vocab, len(tokenizer._tokenizer)),
            eos_token_ids=frozenset(tokenizer.eos_token_ids),
            engine=self.name,
            engine_version=f"upstream {self._kind} {version} at {self._url}{checked}",
            parameters=parameters,
            quantization=quantization_of(config),
        )

    async def _reach(self) -> str:
        """Wait until the endpoint lists the served model; each failed try is reported
        (the node stays LOADING with it) and retried after a growing delay."""
        attempt = 0
        while True:
            why = await self._probe()
            if why is None and self._kind == "vllm":
                why = await token_check(
                    self._session,
                    self._url,
                    self._served_model,
                    self._headers(),
                    self._encode,
                    self._eos,
                    self._reference,
                )
            if why is None:
                if attempt:
                    self._notify(True, f"the upstream endpoint {self._url} answers")
                return await self._version()
            delay = min(self._max_backoff, 2.0**attempt)
            attempt += 1
            log.warning("%s; trying again in %gs (try %d)", why, delay, attempt)
            self._notify(False, f"{why}; trying again in {delay:g}s (try {attempt})")
            await asyncio.sleep(delay)

    async def _probe(self) -> Optional[str]:
        """None if the endpoint serves the model, else why not (one line)."""
        import aiohttp

        try:
            self._key = read_key(self._key_file)  # read each try: a fixed key file is picked up
        except KeyFileError as exc:
            return str(exc)
        try:
            async with self._session.get(
                f"{self._url}/v1/models",
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=self._connect_timeout),
            ) as r:
                body = await r.read()
                if r.status != 200:
                    return f"upstream {self._url}: " + http_failure(
                        r.status, body, self._key_file, retry_hint_s(r.headers)
                    )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return f"the upstream endpoint {self._url} cannot be reached ({type(exc).__name__})"
        try:
            names = {m.get("id") for m in json.loads(body).get("data", ())}
        except (ValueError, AttributeError):
            return f"the upstream endpoint {self._url} answered /v1/models with something that is not a model list"
        if self._served_model not in names:
            return (
                f"the upstream endpoint {self._url} does not serve model {self._served_model!r} "
                "(--upstream-model); it lists " + ", ".join(sorted(str(n) for n in names)[:5])
            )
        return None

    async def _version(self) -> str:
        try:
            async with self._session.get(f"{self._url}/version", headers=self._headers()) as r:
                return str((await r.json()).get("version", "?"))
        except Exception:  # noqa: BLE001 - informational only
            return "?"

    def _reread_key(self) -> None:
        try:
            self._key = read_key(self._key_file)
        except KeyFileError as exc:
            log.warning("%s; keeping the key read before", exc)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"}

    async def _shutdown(self) -> None:
        self._serving = False
        if self._loading is not None:
            self._loading.cancel()
        self._fail_all("the node is shutting down")
        self._flush()
        await self._session.close()

    # -- requests --------------------------------------------------------------------

    def _not_serving(self) -> str:
        return "the upstream endpoint is not reached yet"

    def _http_call(self, req: EngineRequest):
        """(path, body, reader) of the request's streaming call for this kind; the reader's
        `read(msg)` gives (events, finished, failure) and `cut` says it ended the call."""
        if self._kind == "openai":
            path, body = request_body(req, self._served_model, self._decode)
            tokens = TextTokens(self._encode, self._decode, self._spans)
            return path, body, TextReader(tokens, req.max_tokens)
        return "/v1/completions", completion_body(req, self._served_model, self._eos), _TokenReader

    async def _generate(self, req: EngineRequest) -> None:
        import aiohttp

        key = req.key
        refused = refusal(req) if self._kind == "openai" else None
        if refused is not None:
            self._fail(key, refused, status="FAILED_PRECONDITION")  # frees its slot
            return self._pump()
        if self._key_stale:
            self._key_stale = False
            self._reread_key()  # after a 401/403: a fixed key file is used from now on
        path, body, reader = self._http_call(req)
        try:
            async with await post_once_more(
                self._session,
                f"{self._url}{path}",
                body,
                self._headers(),
                key,
                give_up=self._closed.is_set,
            ) as resp:
                if resp.status != 200:
                    retry = retry_hint_s(resp.headers)
                    failure = http_failure(resp.status, await resp.read(), self._key_file, retry)
                    if resp.status in (401, 403):
                        self._key_stale = True  # read the file again before the next request
                    return self._fail(
                        key,
                        failure,
                        error=True,
                        status=http_status(resp.status),
                        retry_after_ms=int(retry * 1000) if retry is not None else 0,
                    )
                finished = False
                async for msg in stream_messages(resp):
                    finished = finished or self._relay(key, reader.read(msg))
                    if reader.cut:  # ended here at max_tokens: closing the call aborts it
                        break
            if not finished:
                self._fail(
                    key,
                    "the upstream endpoint ended the stream without finishing the request",
                    error=True,
                )
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self._fail(
                key,
                f"lost the connection to the upstream endpoint ({type(exc).__name__}); "
                "retry on another node",
                error=True,
                status="UNAVAILABLE",
            )
        finally:
            if self._running.get(key) is asyncio.current_task():
                del self._running[key]
                self._pump()

    def _relay(self, key: str, read: tuple[list[EngineEvent], bool, Optional[str]]) -> bool:
        events, done, failure = read
        if failure is not None:
            self._fail(key, failure, error=True)
            return True
        now = time.monotonic()
        for event in events:
            if event.token >= 0:
                self._rate.append(now)
            self._event(key, event)
        while self._rate and now - self._rate[0] > _RATE_WINDOW_S:
            self._rate.popleft()
        if done:
            self._running.pop(key, None)
        return done

    def _fail(
        self,
        key: str,
        message: str,
        *,
        error: bool = False,
        status: str = "",
        retry_after_ms: int = 0,
    ) -> None:
        """Fail one request; `status` (a gRPC status name) ends the call with it when
        nothing was streamed yet (a mid-stream failure ends with an error final)."""
        if error:
            self._last_error = message
            log.warning("request %s: %s", key, message)
        if self._running.pop(key, None) is not None:
            self._event(
                key,
                EngineEvent(
                    EventKind.FAILED, message=message, status=status, retry_after_ms=retry_after_ms
                ),
            )


class _TokenReader:
    """The vllm kind's streamed chunks as events (token ids come back as they are)."""

    cut = False

    @staticmethod
    def read(msg: dict) -> tuple[list[EngineEvent], bool, Optional[str]]:
        events, done, failure = chunk_events(msg)
        if failure is not None:
            failure = failure.replace("the vLLM server", "the upstream endpoint")
        return events, done, failure
