"""Check callers' JSON schemas in a child process: off the event loop and its GIL, and
killed when a check runs past its time limit (issue 19 #16).

`SchemaChecker.check(text)` sends one schema to a long-lived `python -m
cluster.quality.schema_child` and returns "" (the schema is fine) or the InvalidRequest
message notes.check_schema gave. The protocol is one JSON line each way. A check that
takes longer than `timeout_s` kills the child (the next check starts a new one); checks
wait their turn (the caller's deadline bounds that), at most `max_waiting` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Optional


class CheckTimeout(Exception):
    """The schema took longer than the time limit to check."""


class CheckerBusy(Exception):
    """Too many schemas are waiting to be checked."""


class SchemaChecker:
    """One child process per event loop; checks run one at a time (the lock)."""

    def __init__(self, *, timeout_s: float, max_waiting: int = 32):
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self._proc: Optional[asyncio.subprocess.Process] = None
        self._lock = asyncio.Lock()
        self._waiting = 0

    async def check(self, text: str) -> str:
        """ "" or the refusal message; CheckTimeout past the limit, CheckerBusy when full."""
        if self._waiting >= self.max_waiting:
            raise CheckerBusy()
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        try:
            return await asyncio.wait_for(self._exchange(text), self.timeout_s)
        except TimeoutError:
            raise CheckTimeout() from None
        finally:
            self._lock.release()

    async def _exchange(self, text: str) -> str:
        try:
            proc = await self._started()
            proc.stdin.write(json.dumps(text).encode() + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("the schema checker exited")
            return json.loads(line)["error"]
        except (
            BaseException
        ):  # cancelled (time limit, caller gone) or the child died: never reuse it
            self._kill()
            raise

    async def _started(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cluster.quality.schema_child",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 20,
            )
        return self._proc

    def _kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._proc = None

    async def aclose(self) -> None:
        """Stop the worker and reap it."""
        proc = self._proc
        self._kill()
        if proc is not None:
            await proc.wait()
