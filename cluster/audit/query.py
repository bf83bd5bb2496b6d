"""`query()`: the records of an audit directory that match simple filters, in chain order.

It reads what is there and does not check the chain (run `verify()` for that); lines that
are not whole JSON records, such as a tail torn by a crash, are skipped.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Optional

from cluster.audit.chain import AuditError, list_files

_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_when(text: str, *, now: Optional[datetime] = None) -> datetime:
    """`30m`, `1h`, `7d` (that long before `now`) or an ISO 8601 time (UTC when it names no zone)."""
    text = text.strip()
    m = _DURATION.fullmatch(text)
    if m:
        return (now or datetime.now(timezone.utc)) - timedelta(seconds=float(m[1]) * _SECONDS[m[2]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (45s, 30m, 1h, 7d, 2w) nor an ISO 8601 time "
                         "(2025-01-31T09:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _stamp(when: datetime) -> str:
    """The record time format, so times compare as strings."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def query(directory: Path, since: Optional[datetime] = None, until: Optional[datetime] = None,
          caller: Optional[str] = None, request_id: Optional[str] = None, action: Optional[str] = None,
          type_: Optional[str] = None) -> Iterator[dict]:
    """Records with `since <= time < until` whose `caller`, `request_id`, `action` and `type`
    equal those given (None matches anything). Naive datetimes are taken as UTC."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AuditError(f"{directory} is not a directory: pass the audit log's directory")
    lo = _stamp(since) if since else None
    hi = _stamp(until) if until else None
    wanted = {k: v for k, v in (("caller", caller), ("request_id", request_id), ("action", action),
                                ("type", type_)) if v is not None}
    for _, path in list_files(directory):
        with open(path, "rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                t = record.get("time")
                if (lo or hi) and not isinstance(t, str):
                    continue
                if (lo and t < lo) or (hi and t >= hi):
                    continue
                if all(record.get(k) == v for k, v in wanted.items()):
                    yield record
