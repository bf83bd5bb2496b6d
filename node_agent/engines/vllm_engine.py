"""The vLLM engine: a supervised vLLM OpenAI server, driven over loopback HTTP.

The agent keeps everything the MLX node does (validation, chat template, tokens, stop
sequences, outcomes); vLLM only turns prompt token ids into token ids. Each request is
one streaming /v1/completions call with `prompt` as token ids and `return_token_ids`, so
a resume (prompt + prefix token ids) is exact. Cancelling closes the HTTP stream, which
makes vLLM abort the request. At most `max_running` calls are open (vLLM runs with
`--max-num-seqs max_running`); the rest wait here, as they do on an MLX node.

Everything runs on one thread with its own event loop; requests and cancels reach it
thread-safely, token events leave through `emit`, coalesced once per loop turn. If the
server dies or stops answering /health, every request in flight fails with the cause,
the agent is told (`on_serving`), and the server is restarted with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

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
from node_agent.engines.vllm_metrics import VllmMetrics, parse_metrics
from node_agent.engines.vllm_protocol import (
    KEEPALIVE_S,
    chunk_events,
    completion_body,
    error_type,
    post_once_more,
    stream_messages,
)
from node_agent.engines.vllm_server import ServerError, VllmServer, describe_exit

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 5.0
HEALTH_FAILURES = 3  # consecutive failed /health checks before the server is restarted
METRICS_INTERVAL_S = 1.0
GPU_INTERVAL_S = 5.0
STABLE_AFTER_S = 300.0  # up this long: the restart backoff starts again from its first step
_RATE_WINDOW_S = 10.0


class VllmEngine(LoopEngine):
    """Engine over a vLLM server child; construct, `start(emit)`, then `load()`."""

    name = "vllm"
    what = "vLLM engine"
    server_enforces_schema = True

    def __init__(
        self,
        *,
        model_path: Path,
        model_id: Optional[str] = None,
        max_running: int = 32,
        max_context_tokens: Optional[int] = None,
        state_dir: Path,
        python: str = "",
        extra_args: Sequence[str] = (),
        port: int = 0,
        startup_timeout_s: float = 600.0,
        restart_max_backoff_s: float = 60.0,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ):
        self._path = Path(model_path)
        self._model_id = model_id or self._path.name
        self._init_loop(max_running)
        self._max_context = max_context_tokens
        self._server = VllmServer(
            python=python,
            extra_args=extra_args,
            state_dir=state_dir,
            port=port,
            startup_timeout_s=startup_timeout_s,
        )
        self._max_backoff = restart_max_backoff_s
        self._health_interval = health_interval_s
        self._down_reason = ""  # why it is not serving, while restarting
        self._exited: Optional[asyncio.Event] = None
        self._planned_stop = False
        self._kill_reason = ""
        self._background: list[asyncio.Task] = []
        self._restart_task: Optional[asyncio.Task] = None
        self._restarts = 0
        self._last_exit = ""
        self._up_since = 0.0
        self._metrics = VllmMetrics()
        self._rate: collections.deque[tuple[float, float]] = collections.deque()
        self._gpus: tuple = ()
        self._version = ""
        self._served: Optional[tuple[Path, str, int]] = (
            None  # (path, served name, context) of the loaded model
        )

    # -- called from other threads -------------------------------------------------

    def load(self, model_path: Optional[Path] = None, model_id: Optional[str] = None) -> ModelFacts:
        """(Re)start the server on this model (another than at construction when given);
        blocks until it answers. The agent calls it only with nothing in flight."""
        if model_path is not None:
            self._path = Path(model_path)
            self._model_id = model_id or self._path.name
        return self._call(self._load()).result()

    def stats(self) -> EngineStats:
        m = self._metrics
        now = time.monotonic()
        rate = 0.0
        if len(self._rate) >= 2 and now - self._rate[-1][0] < 3 * METRICS_INTERVAL_S:
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
            rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        server = self._server
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting) + m.waiting,
            decode_tokens_per_s=rate,
            active_memory_bytes=sum(g.memory_used_bytes for g in self._gpus),
            cached_prompt_tokens_total=int(m.prefix_cache_hits_total),
            kv_cache_usage=m.kv_cache_usage,
            gpus=self._gpus,
            server=ServerInfo(
                pid=server.pid if self._serving else 0,
                url=server.base_url if server.port else "",
                restarts=self._restarts,
                last_exit=self._last_exit,
                up_s=now - self._up_since if self._serving else 0.0,
            ),
        )

    def _shutdown_timeout_s(self) -> float:
        """close() stops the server (SIGTERM, then SIGKILL after its grace)."""
        return self._server.stop_grace_s + 15

    def _crashed(self) -> None:
        self._server.kill_group_now()

    async def _open(self) -> None:
        import aiohttp

        self._exited = asyncio.Event()
        # Idle connections are dropped before the server's keep-alive (uvicorn: 5 s) ends
        # them: a request sent on a connection the server is closing would fail.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, use_dns_cache=False, keepalive_timeout=KEEPALIVE_S
            ),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        self._background.append(asyncio.get_running_loop().create_task(self._poll_stats()))

    async def _load(self) -> ModelFacts:
        from mlx_lm.utils import load_tokenizer

        path, model_id = self._path, self._model_id
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json; is it a Hugging Face model directory?"
            )
        config = json.loads((path / "config.json").read_text())
        await self._stop_server("the model was replaced")
        # As mlx_lm.load does it, so both engines stop on the same tokens.
        tokenizer = await asyncio.to_thread(
            load_tokenizer, path, eos_token_ids=config.get("eos_token_id")
        )
        digest = await asyncio.to_thread(weights_digest, path)
        parameters = await asyncio.to_thread(stored_parameters, path)
        context = int(config.get("max_position_embeddings") or 32768)
        if self._max_context:
            context = min(context, self._max_context)
        vocab = int(config.get("vocab_size") or len(tokenizer.vocab))
        self._tokenizer, self._eos = tokenizer, tuple(sorted(tokenizer.eos_token_ids))
        self._served = (path, model_id, context)
        await self._start_server()
        self._version = await self._server_version()
        return ModelFacts(
            model_id=model_id,
            weights_digest=digest,
            context_length=context,
            vocab_size=vocab,
            decodable_vocab_size=min(vocab, len(tokenizer._tokenizer)),
            eos_token_ids=frozenset(tokenizer.eos_token_ids),
            engine=self.name,
            engine_version=f"vLLM {self._version}",
            parameters=parameters,
            quantization=quantization_of(config),
        )

    async def _start_server(self) -> None:
        path, model_id, context = self._served
        self._exited.clear()
        self._planned_stop = False
        self._kill_reason = ""
        await self._server.start(
            self._session, path, model_id, max_model_len=context, max_num_seqs=self._max_running
        )
        self._serving, self._down_reason, self._up_since = True, "", time.monotonic()
        loop = asyncio.get_running_loop()
        self._background = [t for t in self._background if not t.done()]
        self._background += [
            loop.create_task(self._watch()),
            loop.create_task(self._check_health()),
        ]

    async def _server_version(self) -> str:
        try:
            async with self._session.get(f"{self._server.base_url}/version") as r:
                return str((await r.json()).get("version", "?"))
        except Exception:  # noqa: BLE001 - informational only
            return "?"

    async def _stop_server(self, why: str) -> None:
        """A planned stop (new model, shutdown): nothing restarts it."""
        if self._restart_task is not None:
            self._restart_task.cancel()
            await asyncio.gather(self._restart_task, return_exceptions=True)
            self._restart_task = None
        self._planned_stop = True
        self._serving = False
        self._fail_all(why)
        await self._server.stop()

    async def _watch(self) -> None:
        """Wait for the server to exit; an unplanned exit restarts it."""
        server = self._server
        code = await server.wait_exit()
        self._exited.set()
        if self._planned_stop:
            return
        pid = server.pid
        why = self._kill_reason or f"the vLLM server (pid {pid}) {describe_exit(code)}"
        uptime = time.monotonic() - self._up_since
        log.error("%s; restarting it", why)
        self._serving, self._down_reason, self._last_exit = False, why, why
        self._fail_all(f"{why}; the node is restarting it")
        await server.stop()  # its engine-core and workers may have outlived it
        self._restart_task = asyncio.get_running_loop().create_task(
            self._restart(why, stable=uptime > STABLE_AFTER_S)
        )

    async def _restart(self, why: str, *, stable: bool) -> None:
        attempt = 0 if stable else min(self._restarts, 6)
        while not self._closed.is_set():
            delay = min(self._max_backoff, 2.0**attempt)
            self._restarts += 1
            self._notify(False, f"{why}; restarting it in {delay:g}s (restart {self._restarts})")
            await asyncio.sleep(delay)
            try:
                await self._start_server()
            except ServerError as exc:
                why = str(exc)
                self._last_exit = why
                log.error("vLLM server restart %d failed: %s", self._restarts, why)
                attempt += 1
                continue
            self._restart_task = None
            self._notify(
                True,
                f"the vLLM server is serving again (pid {self._server.pid}, restart {self._restarts})",
            )
            return

    async def _check_health(self) -> None:
        """A server that is up but stops answering /health is killed (then restarted)."""
        import aiohttp

        server, failures = self._server, 0
        timeout = aiohttp.ClientTimeout(total=self._health_interval)
        while self._serving and not self._exited.is_set():
            await asyncio.sleep(self._health_interval)
            if not self._serving or self._exited.is_set():
                return
            try:
                async with self._session.get(f"{server.base_url}/health", timeout=timeout) as r:
                    failures = 0 if r.status == 200 else failures + 1
            except (TimeoutError, aiohttp.ClientError):
                failures += 1
            if failures >= HEALTH_FAILURES:
                self._kill_reason = (
                    f"the vLLM server (pid {server.pid}) failed {failures} health checks "
                    f"{self._health_interval:g}s apart"
                )
                log.error("%s; killing it", self._kill_reason)
                server.kill_group_now()
                return

    async def _poll_stats(self) -> None:
        import aiohttp

        from node_agent.telemetry import gpu_readings

        timeout = aiohttp.ClientTimeout(total=2)
        gpus_at = 0.0
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            now = time.monotonic()
            if now - gpus_at >= GPU_INTERVAL_S:
                gpus_at = now
                self._gpus = tuple(await asyncio.to_thread(gpu_readings))
            if not self._serving:
                continue
            try:
                async with self._session.get(
                    f"{self._server.base_url}/metrics", timeout=timeout
                ) as r:
                    self._metrics = parse_metrics(await r.text())
            except (TimeoutError, aiohttp.ClientError):
                continue
            self._rate.append((now, self._metrics.generation_tokens_total))
            while self._rate and now - self._rate[0][0] > _RATE_WINDOW_S:
                self._rate.popleft()

    async def _shutdown(self) -> None:
        await self._stop_server("the node is shutting down")
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._flush()
        await self._session.close()

    # -- requests --------------------------------------------------------------------

    def _not_serving(self) -> str:
        return f"the vLLM server is not serving: {self._down_reason or 'no model is loaded'}"

    async def _generate(self, req: EngineRequest) -> None:
        import aiohttp

        key = req.key
        try:
            async with await self._post(req) as resp:
                if resp.status != 200:
                    return self._fail(
                        key,
                        f"the vLLM server refused the request (HTTP {resp.status}"
                        f"{error_type(await resp.read())})",
                    )
                finished = False
                async for msg in stream_messages(resp):
                    finished = finished or self._relay(key, msg)
            if not finished:
                self._fail(key, "the vLLM server ended the stream without finishing the request")
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self._fail(key, await self._lost(exc))
        finally:
            if self._running.get(key) is asyncio.current_task():
                del self._running[key]
                self._pump()

    async def _post(self, req: EngineRequest):
        return await post_once_more(
            self._session,
            f"{self._server.base_url}/v1/completions",
            completion_body(req, self._served[1], self._eos),
            {"Content-Type": "application/json"},
            req.key,
            give_up=self._exited.is_set,
        )

    def _relay(self, key: str, msg: dict) -> bool:
        """One streamed completion chunk as token events; True once the request finished."""
        events, done, failure = chunk_events(msg)
        if failure is not None:
            self._fail(key, failure)
            return True
        for event in events:
            self._event(key, event)
        if done:
            self._running.pop(key, None)
        return done

    async def _lost(self, exc: BaseException) -> str:
        """Why a stream broke: the server's exit if it died, else the connection error."""
        try:
            await asyncio.wait_for(self._exited.wait(), timeout=2.0)
        except TimeoutError:
            return f"lost the connection to the vLLM server ({type(exc).__name__})"
        return f"{self._down_reason or 'the vLLM server stopped'}; the node is restarting it"

    def _fail(self, key: str, message: str) -> None:
        if self._running.pop(key, None) is not None:
            self._event(key, EngineEvent(EventKind.FAILED, message=message))
