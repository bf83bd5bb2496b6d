"""`query()`: the records of an audit directory that match simple filters, in chain order;
`query_chains()`: the same over several directories (one chain per coordinator), by time.

It reads what is there and does not check the chain (run `verify()` for that); lines that
are not whole JSON records, such as a tail torn by a crash, are skipped. A request's (or an
admin call's) `accepted` record and the record that ends it are shown as one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
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
        return (now or datetime.now(UTC)) - timedelta(seconds=float(m[1]) * _SECONDS[m[2]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (45s, 30m, 1h, 7d, 2w) nor an ISO 8601 time "
            "(2025-01-31T09:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _stamp(when: datetime) -> str:
    """The record time format, so times compare as strings."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def query(
    directory: Path,
    since: Optional[datetime] = None,
    until: Optional[datetime] = None,
    caller: Optional[str] = None,
    request_id: Optional[str] = None,
    action: Optional[str] = None,
    type_: Optional[str] = None,
    merge: bool = True,
) -> Iterator[dict]:
    """Records with `since <= time < until` whose `caller`, `request_id`, `action` and `type`
    equal those given (None matches anything). Naive datetimes are taken as UTC.

    With `merge`, an `accepted` record and the record that ends it (same type, action,
    coordinator, caller and request_id or operation_id) are one record: the end record with
    `accepted_seq` and `accepted_time` added, at the end record's place. An accepted record
    nothing ended (its coordinator was killed, or it is still running) comes as it is, before
    the next `open` record or at the end."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AuditError(f"{directory} is not a directory: pass the audit log's directory")
    lo = _stamp(since) if since else None
    hi = _stamp(until) if until else None
    wanted = {
        k: v
        for k, v in (
            ("caller", caller),
            ("request_id", request_id),
            ("action", action),
            ("type", type_),
        )
        if v is not None
    }
    records = _read(directory)
    for record in _merged(records) if merge else records:
        t = record.get("time")
        if (lo or hi) and not isinstance(t, str):
            continue
        if (lo and t < lo) or (hi and t >= hi):
            continue
        if all(record.get(k) == v for k, v in wanted.items()):
            yield record


def query_chains(directories: Sequence[Path], **filters) -> list[dict]:
    """The records of several chains (one per coordinator) matching `filters` (as `query()`),
    interleaved by `time`; records with equal times keep chain order, the directories' order
    first. Each record gets `chain`: its directory as given, so a request one coordinator
    accepted and another resumed (`resumed_from`, `resumed_after_tokens`) reads as one story
    under its request id. Each chain is read as `query()` reads it, never checked: run
    `verify()` on each. Holds the matching records in memory: filter a large log."""
    tagged = []
    for rank, directory in enumerate(directories):
        for order, record in enumerate(query(directory, **filters)):
            t = record.get("time")
            tagged.append(
                (t if isinstance(t, str) else "", rank, order, {**record, "chain": str(directory)})
            )
    tagged.sort(key=lambda item: item[:3])
    return [record for *_, record in tagged]


def _read(directory: Path) -> Iterator[dict]:
    for _, path in list_files(directory):
        with open(path, "rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record


def _key(record: dict) -> Optional[tuple]:
    """What links an accepted record to its end; None for records that are never split."""
    kind = record.get("type")
    ident = record.get(
        "request_id" if kind == "request" else "operation_id" if kind == "admin" else ""
    )
    if not isinstance(ident, str) or not ident:
        return None
    return kind, record.get("action"), record.get("coordinator"), record.get("caller"), ident


def _merged(records: Iterator[dict]) -> Iterator[dict]:
    pending: dict[tuple, list[dict]] = {}

    def orphans() -> Iterator[dict]:
        left = sorted(
            (r for waiting in pending.values() for r in waiting), key=lambda r: r.get("seq") or 0
        )
        pending.clear()
        yield from left

    for record in records:
        if (
            record.get("type") == "open"
        ):  # one writer per directory: what the last one left open stays so
            yield from orphans()
        key = _key(record)
        if key is not None and record.get("outcome") == "accepted":
            pending.setdefault(key, []).append(record)
            continue
        waiting = pending.get(key) if key is not None else None
        if waiting:
            accepted = waiting.pop(0)
            if not waiting:
                del pending[key]
            record = {
                **record,
                "accepted_seq": accepted.get("seq"),
                "accepted_time": accepted.get("time"),
            }
        yield record
    yield from orphans()
