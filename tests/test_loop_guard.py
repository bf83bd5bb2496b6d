"""The event-loop guard (tests/loop_guard.py) catches blocking calls, even swallowed ones,
and leaves threads and opted-out tests alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests import loop_guard


def _guarded(coro_fn):
    """Run `coro_fn` under the guard's own activation; return the calls it recorded."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(loop_guard._bb, "BlockingError", loop_guard.RecordedBlockingError)
    loop_guard._Seen.calls = []
    buster = loop_guard._activate()
    try:
        asyncio.run(coro_fn())
    finally:
        buster.deactivate()
        monkeypatch.undo()
    return list(loop_guard._Seen.calls)


@pytest.mark.allow_blocking("checks the guard itself, with its own activation")
def test_guard_records_blocking_calls_even_when_swallowed(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")

    async def blocks():
        try:
            time.sleep(0.001)
        except Exception:  # noqa: BLE001 - a handler that swallows it must not hide it
            pass
        try:
            path.read_text()
        except Exception:  # noqa: BLE001
            pass

    calls = _guarded(blocks)
    assert len(calls) == 2, calls
    assert calls[0].startswith("time.sleep at ") and "test_loop_guard.py" in calls[0]
    assert "read" in calls[1]


@pytest.mark.allow_blocking("checks the guard itself, with its own activation")
def test_guard_allows_threads_and_awaits():
    async def fine():
        await asyncio.to_thread(time.sleep, 0.001)
        await asyncio.sleep(0)

    assert _guarded(fine) == []
    time.sleep(0.001)  # no loop running here: not a blocking call on a loop
