"""What the engines that stream from an HTTP server share (vllm_engine, upstream_engine):
an asyncio loop on a thread of their own, requests admitted up to `max_running` as tasks,
and their events handed to the agent in one batch per loop turn."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from concurrent.futures import Future
from typing import Callable, Optional

from node_agent.engine import Emit, EngineClosed, EngineEvent, EngineRequest, EventKind

log = logging.getLogger(__name__)


class LoopEngine:
    """Subclasses set `name`, `what` (for messages: "vLLM engine") and implement `_open`,
    `_generate(req)`, `_not_serving()` and `_shutdown()` (on the thread, at close, within
    `_shutdown_timeout_s()`); `_crashed()` runs if the thread dies or the shutdown fails."""

    name: str
    what: str

    def _init_loop(self, max_running: int) -> None:
        self._max_running = max_running
        self._tokenizer = None
        self._eos: tuple[int, ...] = ()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._gate = threading.Lock()
        self._emit: Optional[Emit] = None
        self._on_exit: Optional[Callable[[str], None]] = None
        self._on_serving: Optional[Callable[[bool, str], None]] = None
        # Loop-thread state.
        self._session = None
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._running: dict[str, asyncio.Task] = {}
        self._out: dict[str, list[EngineEvent]] = {}
        self._flush_due = False
        self._serving = False

    # -- called from other threads -------------------------------------------------

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed.is_set()

    def start(
        self,
        emit: Emit,
        on_exit: Optional[Callable[[str], None]] = None,
        on_serving: Optional[Callable[[bool, str], None]] = None,
    ) -> None:
        self._emit, self._on_exit, self._on_serving = emit, on_exit, on_serving
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-engine", daemon=True)
        self._thread.start()
        self._ready.wait()

    def submit(self, request: EngineRequest) -> None:
        self._send(self._enqueue, request)

    def cancel(self, key: str) -> None:
        with self._gate:
            if not self._closed.is_set() and self._loop is not None:
                self._loop.call_soon_threadsafe(self._cancel, key)

    def _send(self, fn, arg) -> None:
        with self._gate:
            if self._closed.is_set() or self._loop is None:
                raise EngineClosed(f"the {self.what} is not running")
            self._loop.call_soon_threadsafe(fn, arg)

    def _call(self, coro) -> Future:
        with self._gate:
            if self._closed.is_set() or self._loop is None:
                coro.close()
                raise EngineClosed(f"the {self.what} is not running")
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        """Fail what is left, run `_shutdown` on the engine thread and stop it; idempotent."""
        with self._gate:
            if self._thread is None or self._closed.is_set():
                return
            self._closed.set()
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            fut.result(timeout=self._shutdown_timeout_s())
        except Exception as exc:  # noqa: BLE001 - the loop is stopped below in any case
            log.error("%s shutdown did not finish cleanly: %s", self.what, type(exc).__name__)
            self._crashed()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _shutdown_timeout_s(self) -> float:
        return 15.0

    # -- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        reason = ""
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._open())
            self._ready.set()
            loop.run_forever()
        except BaseException as exc:  # noqa: BLE001 - the thread must report, not vanish
            reason = f"the {self.what} thread crashed ({type(exc).__name__})"
            log.error("%s thread crashed: %s", self.what, type(exc).__name__)
        finally:
            self._ready.set()
            with self._gate:
                self._closed.set()
            if reason:
                self._crashed()
                if self._on_exit is not None:
                    self._on_exit(reason)
            loop.close()

    async def _open(self) -> None:
        raise NotImplementedError

    async def _generate(self, req: EngineRequest) -> None:
        raise NotImplementedError

    def _not_serving(self) -> str:
        """Why a request arriving now cannot be sent (the engine is not serving)."""
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError

    def _crashed(self) -> None:
        """The thread died: release what it held outside this process."""

    def _notify(self, serving: bool, why: str) -> None:
        if self._on_serving is not None:
            self._on_serving(serving, why)

    # -- requests --------------------------------------------------------------------

    def _enqueue(self, req: EngineRequest) -> None:
        if self._closed.is_set():
            self._event(req.key, EngineEvent(EventKind.FAILED, message="the engine stopped"))
        elif not self._serving:
            self._event(req.key, EngineEvent(EventKind.FAILED, message=self._not_serving()))
        else:
            self._waiting.append(req)
            self._pump()

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting and len(self._running) < self._max_running:
            req = self._waiting.popleft()
            self._running[req.key] = loop.create_task(self._generate(req))
            self._event(req.key, EngineEvent(EventKind.ADMITTED))

    def _cancel(self, key: str) -> None:
        task = self._running.pop(key, None)
        if task is not None:
            task.cancel()  # closes the stream: the server aborts the request
            self._pump()
            return
        for req in self._waiting:
            if req.key == key:
                self._waiting.remove(req)
                return

    def _fail_all(self, message: str) -> None:
        for key, task in list(self._running.items()):
            task.cancel()
            self._event(key, EngineEvent(EventKind.FAILED, message=message))
        self._running.clear()
        while self._waiting:
            self._event(self._waiting.popleft().key, EngineEvent(EventKind.FAILED, message=message))

    def _event(self, key: str, event: EngineEvent) -> None:
        self._out.setdefault(key, []).append(event)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self._out:
            out, self._out = self._out, {}
            self._emit(list(out.items()))
