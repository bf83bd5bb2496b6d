"""Shared by the audit tests: how to fill a chain, and where a record lives (the `pristine`
and `chain` fixtures built from them are in conftest.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cluster.audit import AuditKeys, AuditLog, verify
from cluster.audit.chain import default_key_dir, list_files

ROOT = Path(__file__).resolve().parents[1]
N = 300
EVERY = 50
pytestmark = pytest.mark.timeout(60)


def open_log(directory: Path, **kw) -> AuditLog:
    log = AuditLog(
        directory,
        keys=AuditKeys.load_or_create(default_key_dir(directory)),
        source="test-host",
        **kw,
    )
    log.open()
    return log


def request(i: int, keys: AuditKeys) -> dict:
    return {
        "type": "request",
        "caller": f"user{i % 3}",
        "role": "clinician",
        "action": "generate",
        "request_id": f"req-{i:04d}",
        "outcome": "ok",
        "code": "OK",
        "nodes": ["node-a"],
        "tokens": 100 + i,
        "prompt_digest": keys.digest(f"prompt {i}"),
    }


def fill(directory: Path, n: int = N, **kw) -> list[dict]:
    """n records: half from concurrent write() tasks, half through submit() futures."""
    log = open_log(directory, **kw)

    async def main() -> list[dict]:
        written = await asyncio.gather(*(log.write(request(i, log.keys)) for i in range(n // 2)))
        futures = [log.submit(request(i, log.keys)) for i in range(n // 2, n)]
        return list(written) + [f.result(timeout=10) for f in futures]

    try:
        return asyncio.run(main())
    finally:
        log.close()


def records(directory: Path) -> list[dict]:
    return [
        json.loads(line) for _, p in list_files(directory) for line in p.read_bytes().splitlines()
    ]


def locate(directory: Path, seq: int) -> tuple[Path, int]:
    """(file, 1-based line) of record `seq`."""
    for _, path in list_files(directory):
        for i, line in enumerate(path.read_bytes().splitlines(), 1):
            if json.loads(line)["seq"] == seq:
                return path, i
    raise AssertionError(f"record {seq} not found")


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def assert_bad(directory: Path, seq: int, file: Path, line: int, *words: str):
    report = verify(directory)
    assert not report.ok, report
    bad = report.first_bad
    assert (bad.seq_expected, bad.file, bad.line) == (seq, file.name, line), bad
    for w in words:
        assert w in bad.reason, bad.reason
    return bad
