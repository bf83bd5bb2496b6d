"""What every StudioFleet daemon does on its way out."""

from __future__ import annotations

import logging
import os
import sys


def exit_now(code: int) -> None:
    """Flush logs and stdio, then exit without interpreter teardown.

    Used after an orderly shutdown (server stopped, every request at its terminal outcome,
    engine thread joined) and when the second signal's deadline passes. Python's teardown
    would free gRPC's and MLX's native objects in whatever order the garbage collector
    picks; that has aborted the process (SIGABRT, seen once in CI), turning a clean drain
    into a crash exit that a supervisor (launchd) would report and restart.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
