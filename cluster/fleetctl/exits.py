"""Exit codes a script can rely on, and the one place errors are printed."""

from __future__ import annotations

import typer

from cluster.client.errors import FleetError

EXIT_ERROR, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_OVERLOADED, EXIT_DEADLINE = 1, 2, 3, 4, 5
EXIT_NOT_FOUND, EXIT_ROLLOUT_FAILED, EXIT_ROLLOUT_ABORTED, EXIT_ROLLOUT_PAUSED = 6, 7, 8, 9
_BY_CODE = {
    "NOT_FOUND": EXIT_NOT_FOUND,
    "ALREADY_EXISTS": EXIT_BAD_INPUT,
    "INVALID_ARGUMENT": EXIT_BAD_INPUT,
    "FAILED_PRECONDITION": EXIT_BAD_INPUT,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "RESOURCE_EXHAUSTED": EXIT_OVERLOADED,
    "DEADLINE_EXCEEDED": EXIT_DEADLINE,
}


def fail(err: FleetError, target: str) -> "typer.Exit":
    hint = f" (retry after {err.retry_after_ms} ms)" if err.retry_after_ms else ""
    where = "" if getattr(err, "target", "") else f"{target}: "  # the client already named it
    typer.echo(f"fleetctl: {where}{err.code}: {err.message}{hint}", err=True)
    return typer.Exit(_BY_CODE.get(err.code, EXIT_ERROR))
