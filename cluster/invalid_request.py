"""The error every input check raises (InvalidRequest), and `guarded`, which turns any
other exception while checking into one. Shared by cluster.validation and the quality
checks it calls (cluster.quality.notes, prompts), which this module lets import it
without importing cluster.validation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar


class InvalidRequest(ValueError):
    """The request cannot be served as sent (gRPC INVALID_ARGUMENT)."""


_F = TypeVar("_F", bound=Callable)


def guarded(fn: _F) -> _F:
    """Any exception while checking (a RecursionError from deep nesting, a library's own
    error) becomes an InvalidRequest naming only its type, so it is refused and audited as
    bad input instead of escaping as UNKNOWN/500; the exception text may quote the input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InvalidRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - input we could not check is input we refuse
            raise InvalidRequest(
                f"the request could not be checked ({type(exc).__name__}); it is nested too "
                "deeply or too large: simplify it"
            ) from None

    return wrapper  # type: ignore[return-value]
