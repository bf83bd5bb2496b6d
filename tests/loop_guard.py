"""The event-loop guard: a test fails when code on a running event loop's thread makes a
blocking call (blockbuster, as python-zeroconf's suite uses it).

Blockbuster wraps time.sleep, blocking file, socket and os calls, and raises
`blockbuster.BlockingError` when one runs on a thread whose event loop is running. It is
deterministic: the call is flagged, not its duration, so a loaded machine cannot make it
fail. Its check of `threading.Lock.acquire` is left out for that reason (it flags only a
lock that happens to be held at that instant). Calls from threads (asyncio.to_thread,
executors, gRPC's own threads) and from sync tests are untouched.

A test that blocks a loop on purpose opts out: `@pytest.mark.allow_blocking("why")`.
It covers the test process (clients, in-process servers such as test_staging's node
service); the daemons run in subprocesses, where asyncio's slow-callback warning would be
timing-based (flaky on a loaded 2-core machine) and its handle reprs can carry request text.
"""

from __future__ import annotations

import os
import traceback

import blockbuster.blockbuster as _bb
import pytest
from blockbuster import BlockBuster, BlockingError

# The two lock checks depend on timing (another thread holding the lock at that moment).
UNTIMED_ONLY = ("threading.Lock.acquire", "threading.Lock.acquire_lock")
# Known blocking calls on a loop, each with why it is still there. Keep this short: an
# entry is debt, to be fixed where the call is made, not a place to silence new finds.
KNOWN_BLOCKING: set[tuple[str, str]] = set()  # (file, function): none today


class _Seen:
    calls: list[str] = []


class RecordedBlockingError(BlockingError):
    """Raised as blockbuster's own error, and remembered: code that catches it (a broad
    `except Exception` in a handler) still fails the test at teardown."""

    def __init__(self, func: str) -> None:
        super().__init__(func)
        ours = [f for f in traceback.extract_stack()[:-1] if "/blockbuster/" not in f.filename]
        where = " <- ".join(
            f"{f.filename.rpartition('/')[2]}:{f.lineno} {f.name}" for f in reversed(ours[-4:])
        )
        _Seen.calls.append(f"{func} at {where}")


def _devnull_or(predicate):
    """pytest's logging plugin keeps a file handler on os.devnull when no --log-file is
    given, and every record on a loop reaches it; a write there never blocks."""

    def allowed(file, *args, **kwargs) -> bool:
        return getattr(file, "name", None) == os.devnull or predicate(file, *args, **kwargs)

    return allowed


def _activate() -> BlockBuster:
    buster = BlockBuster()  # scanned: every module, so a test's own coroutines count too
    for name in UNTIMED_ONLY:
        buster.functions.pop(name, None)
    for key, function in buster.functions.items():
        if key.startswith("io.") and key.endswith(".write"):
            function.can_block_predicate = _devnull_or(function.can_block_predicate)
        for filename, name in KNOWN_BLOCKING:
            function.can_block_in(filename, name)
    buster.activate()
    return buster


@pytest.fixture(autouse=True)
def no_blocking_on_event_loop(request):
    """Fails the test if anything blocks a running event loop (see tests/loop_guard.py)."""
    if request.node.get_closest_marker("allow_blocking"):
        yield
        return
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(_bb, "BlockingError", RecordedBlockingError)
    _Seen.calls = []
    buster = _activate()
    try:
        yield
    finally:
        buster.deactivate()
        monkeypatch.undo()
    if _Seen.calls:
        pytest.fail(
            "blocking call(s) on a running event loop (move them to asyncio.to_thread, or mark the test "
            "@pytest.mark.allow_blocking(reason) if it blocks on purpose):\n  "
            + "\n  ".join(dict.fromkeys(_Seen.calls)),
            pytrace=False,
        )
