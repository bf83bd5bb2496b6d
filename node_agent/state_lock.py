"""One agent per state directory: an exclusive lock held for the life of the process.

Two agents sharing a directory would overwrite each other's cordon, drain and active
model and stage weights into one area. The lock is an flock on DIR/agent.lock (released
by the OS when the process ends, however it ends); the file names the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

LOCK_NAME = "agent.lock"
_held: dict[Path, int] = {}  # directory -> descriptor, kept open until the process exits


def hold(state_dir: Path) -> Optional[str]:
    """Lock `state_dir` for this process; None when held, else one line naming the holder."""
    state_dir = Path(state_dir).resolve()
    if state_dir in _held:
        return None
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        return f"state directory {state_dir} cannot be locked ({exc.strerror}); give a writable --state-dir"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return (
            f"state directory {state_dir} is in use by another fleet-node (pid {holder}); give each agent "
            "on a host its own --state-dir"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[state_dir] = fd
    return None
