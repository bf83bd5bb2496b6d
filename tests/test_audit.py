"""The audit chain: group-committed durable writes, rotation, crash recovery, queries and
the CLI. Real files and real fsync; no mocks. Tampering: tests/test_audit_tamper.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from cluster.audit import AuditError, AuditKeys, AuditLog, parse_when, query, verify
from cluster.audit.chain import default_key_dir, list_files
from cluster.fleetctl import audit_cmd
from tests.audit_helpers import EVERY, ROOT, N, assert_bad, fill, lines, locate, open_log, records


def test_concurrent_writes_are_batched_durable_and_verify(tmp_path):
    written = fill(tmp_path / "audit", checkpoint_every=EVERY)
    assert len({r["seq"] for r in written}) == len(written) == N
    on_disk = records(tmp_path / "audit")
    assert [r["seq"] for r in on_disk] == list(range(1, len(on_disk) + 1))
    assert on_disk[0]["type"] == "open" and on_disk[0]["prev"] == "0" * 64
    assert on_disk[-1]["type"] == "checkpoint"  # the final one, written at close
    by_seq = {r["seq"]: r for r in on_disk}
    assert all(by_seq[r["seq"]] == r for r in written)  # write() returns the record as written
    report = verify(tmp_path / "audit")
    assert report.ok and not report.warnings, report
    assert report.records == len(on_disk) and report.head_seq == len(on_disk)
    assert report.checkpoints == sum(r["type"] == "checkpoint" for r in on_disk)
    assert oct((tmp_path / "audit" / "audit-000001.jsonl").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "audit").stat().st_mode & 0o777) == "0o700"


def test_group_commit_shares_fsyncs_across_tasks_and_threads(tmp_path):
    log = open_log(tmp_path / "audit", checkpoint_every=10_000)

    async def main():
        await asyncio.gather(*(log.write({"type": "request", "n": i}) for i in range(500)))

    def submitter(t: int) -> list[int]:
        return [
            f.result(timeout=10)["seq"]
            for f in [log.submit({"type": "admin", "t": t}) for _ in range(50)]
        ]

    try:
        asyncio.run(main())
        assert log.stats.batches < 50, log.stats  # 500 concurrent writers, a handful of fsyncs
        with ThreadPoolExecutor(8) as pool:
            seqs = [seq for got in pool.map(submitter, range(8)) for seq in got]
    finally:
        log.close()
    assert len(set(seqs)) == 400 and log.stats.write_errors == 0
    assert verify(tmp_path / "audit").ok


def test_checkpoints_every_n_records_and_signed(pristine):
    recs = records(pristine)
    checkpoints = [r for r in recs if r["type"] == "checkpoint"]
    assert len(checkpoints) == -(
        -(N + 1) // EVERY
    )  # N requests + the open record, and one at close
    start = 1
    for c in checkpoints:
        assert c["covers"] == [start, c["seq"] - 1] and c["head"] == c["prev"]
        assert c["seq"] - start <= EVERY
        start = c["seq"] + 1
    assert [c["seq"] - c["covers"][0] for c in checkpoints[:-1]] == [EVERY] * (len(checkpoints) - 1)


def test_checkpoint_after_interval_when_idle(tmp_path):
    log = open_log(tmp_path / "audit", checkpoint_interval_s=0.2)
    try:
        log.submit({"type": "admin", "action": "drain"}).result(timeout=5)
        deadline = time.monotonic() + 5
        while not any(r["type"] == "checkpoint" for r in records(tmp_path / "audit")):
            assert time.monotonic() < deadline, "no checkpoint 5 s after the interval"
            time.sleep(0.05)
        assert verify(tmp_path / "audit").ok
    finally:
        log.close()


# -- tampering ---------------------------------------------------------------------------------


def test_rotation_keeps_the_chain_linked_and_a_deleted_middle_file_is_caught(tmp_path):
    directory = tmp_path / "audit"
    fill(directory, n=120, max_file_bytes=4096, checkpoint_every=1000)
    files = [p for _, p in list_files(directory)]
    assert len(files) >= 5
    assert all(p.stat().st_size <= 4096 for p in files)
    for before, after in zip(files, files[1:], strict=False):
        last, first = json.loads(lines(before)[-1]), json.loads(lines(after)[0])
        assert last["type"] == "checkpoint"  # each file ends signed
        assert (first["seq"], first["prev"]) == (last["seq"] + 1, last["hash"])
    report = verify(directory)
    assert report.ok and report.files == [p.name for p in files], report
    gone = files[2]
    first_gone = json.loads(lines(gone)[0])["seq"]
    gone.unlink()
    assert_bad(directory, first_gone, files[3], 1, gone.name, "missing")


# -- crash recovery ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "torn",
    [b'{"caller":"user1","prev":"ab', b"\x00" * 64, b'{"seq":999,"hash":"00"}\n'],
    ids=["half-line", "zeros", "bad-hash"],
)
def test_torn_tail_warns_then_is_recovered_on_open(chain, torn):
    path, _ = locate(chain, 1)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(torn)
    report = verify(chain)
    assert report.ok, report.first_bad
    assert len(report.warnings) == 1 and "never acknowledged" in report.warnings[0]
    last_seq = report.records
    log = open_log(chain)
    log.close()
    recs = records(chain)
    recovered = next(r for r in recs if r["type"] == "recovered")
    assert (recovered["seq"], recovered["offset"], recovered["discarded_bytes"]) == (
        last_seq + 1,
        size,
        len(torn),
    )
    assert recs[recovered["seq"]]["type"] == "open"
    report = verify(chain)
    assert report.ok and not report.warnings, report


def test_crash_just_after_rotation_resumes_from_the_previous_file(tmp_path):
    directory = tmp_path / "audit"
    fill(directory, n=40, max_file_bytes=4096)
    number, last = list_files(directory)[-1]
    torn = directory / f"audit-{number + 1:06d}.jsonl"
    torn.write_bytes(b'{"caller":"user0","pr')  # the new file got half a line before the crash
    report = verify(directory)
    assert report.ok and "never acknowledged" in report.warnings[0], report
    open_log(directory).close()
    first = json.loads(lines(torn)[0])
    assert first["type"] == "recovered" and first["prev"] == json.loads(lines(last)[-1])["hash"]
    report = verify(directory)
    assert report.ok and not report.warnings, report


def test_head_ahead_of_the_file_refuses_to_open(chain):
    path, _ = locate(chain, 1)
    raw = lines(path)
    path.write_bytes(b"".join(raw[:-3]))
    total = len(raw)
    assert_bad(
        chain, total - 2, path, total - 2, "signed HEAD", f"records {total - 2}-{total} are missing"
    )
    with pytest.raises(
        AuditError, match=f"ends at record {total - 3} but the signed HEAD says record {total}"
    ):
        open_log(chain)


_KILLED_WRITER = """
import asyncio, sys
from pathlib import Path
from cluster.audit import AuditKeys, AuditLog
from cluster.audit.keys import default_key_dir
d = Path(sys.argv[1])
log = AuditLog(d, keys=AuditKeys.load_or_create(default_key_dir(d)), source="killed", checkpoint_every=25)
log.open()
async def worker(w):
    i = 0
    while True:
        rec = await log.write({"type": "request", "caller": f"w{w}", "request_id": f"w{w}-{i}"})
        sys.stdout.write(f"{rec['seq']}\\n")
        sys.stdout.flush()
        i += 1
async def main():
    await asyncio.gather(*(worker(w) for w in range(16)))
asyncio.run(main())
"""


def test_sigkilled_writer_loses_no_acknowledged_record(tmp_path):
    directory = tmp_path / "audit"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(directory)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    acked = []
    try:
        while len(acked) < 400:
            line = proc.stdout.readline()
            assert line, f"writer exited early: {proc.stderr.read().decode()[-2000:]}"
            acked.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    acked += [int(x) for x in rest.split(b"\n")[:-1]]  # a line cut by the kill has no newline
    report = verify(directory)
    assert report.ok, report.first_bad
    assert all("never acknowledged" in w or "before acknowledging" in w for w in report.warnings)
    present = {r["seq"] for r in query(directory, type_="request")}
    assert set(acked) <= present, sorted(set(acked) - present)[:10]
    open_log(directory).close()
    report = verify(directory)
    assert report.ok and not report.warnings, report
    assert set(acked) <= {r["seq"] for r in query(directory, type_="request")}


def test_write_failure_fails_the_batch_and_the_writer_carries_on(tmp_path):
    """A real EFBIG from RLIMIT_FSIZE, in a child process so the limit stays there."""
    script = """
import resource, signal, sys
from pathlib import Path
from cluster.audit import AuditKeys, AuditLog, AuditWriteError
from cluster.audit.keys import default_key_dir
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
d = Path(sys.argv[1])
log = AuditLog(d, keys=AuditKeys.load_or_create(default_key_dir(d)), source="full-disk")
log.open()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, ((d / "audit-000001.jsonl").stat().st_size + 1500, hard))
errors = 0
for i in range(20):
    try:
        log.submit({"type": "request", "request_id": f"secret-{i}", "pad": "x" * 200}).result(timeout=10)
    except AuditWriteError as exc:
        errors += 1
        assert "audit-000001.jsonl" in str(exc) and "Errno 27" in str(exc) and "secret" not in str(exc), exc
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
log.submit({"type": "request", "request_id": "after"}).result(timeout=10)
log.close()
print(errors, log.stats.write_errors, log.stats.last_error)
"""
    directory = tmp_path / "audit"
    out = subprocess.run(
        [sys.executable, "-c", script, str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    errors, write_errors, _ = out.stdout.split(" ", 2)
    assert int(errors) > 10 and int(write_errors) >= int(errors)
    report = verify(directory)
    assert report.ok and not report.warnings, report
    ids = [r.get("request_id") for r in query(directory, type_="request")]
    assert ids[-1] == "after" and len(ids) == 20 - int(errors) + 1


# -- the writer's contract ---------------------------------------------------------------------


def test_cancelled_writer_still_gets_its_record_written(tmp_path):
    log = open_log(tmp_path / "audit")

    async def main():
        task = asyncio.create_task(log.write({"type": "request", "request_id": "cancelled-caller"}))
        await asyncio.sleep(0)  # the task has submitted and is waiting for the fsync
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await log.write(
            {"type": "admin", "action": "after"}
        )  # batches are in order: the first is durable

    asyncio.run(main())
    log.close()
    assert [r["request_id"] for r in query(tmp_path / "audit", request_id="cancelled-caller")] == [
        "cancelled-caller"
    ]


def test_malformed_records_and_misuse_are_refused(tmp_path):
    log = open_log(tmp_path / "audit")
    try:
        for bad, err in [
            ({"type": "request", "seq": 5}, ValueError),
            ({"type": "checkpoint"}, ValueError),
            ({"action": "x"}, ValueError),
            ({"type": "request", "x": float("nan")}, ValueError),
            ({"type": "request", "x": b"bytes"}, TypeError),
            ({"type": "admin", "d": {1: 2}}, TypeError),
        ]:
            with pytest.raises(err):
                log.submit(bad)
        with pytest.raises(AuditError, match="LOCK"):
            open_log(tmp_path / "audit")
    finally:
        log.close()
        log.close()  # idempotent
    with pytest.raises(AuditError, match="closed"):
        log.submit({"type": "admin"})
    assert verify(tmp_path / "audit").ok


def test_keyed_digest_is_not_a_plain_hash_and_depends_on_the_key(tmp_path):
    a = AuditKeys.load_or_create(tmp_path / "a")
    b = AuditKeys.load_or_create(tmp_path / "b")
    digest = a.digest(b"1985-03-02")
    kind, key_id, hexd = digest.split(":")
    assert kind == "hmac-sha256" and key_id == a.key_id and len(hexd) == 64
    assert hexd != hashlib.sha256(b"1985-03-02").hexdigest()
    assert b.digest(b"1985-03-02") != digest and a.key_id != b.key_id
    stream = a.digest_stream()
    for part in (b"1985", b"-03", b"-02"):
        stream.update(part)
    assert stream.hexdigest_str() == digest == a.digest("1985-03-02")
    again = AuditKeys.load_or_create(tmp_path / "a")
    assert again.digest(b"1985-03-02") == digest and again.fingerprint == a.fingerprint
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert modes == {"hmac.key": 0o600, "signing.key": 0o600, "signing.pub": 0o644}
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    (tmp_path / "a" / "hmac.key").chmod(0o644)
    with pytest.raises(AuditError, match="chmod 600"):
        AuditKeys.load_or_create(tmp_path / "a")


# -- query and CLI -----------------------------------------------------------------------------


def test_query_filters(tmp_path):
    t0 = datetime(2025, 1, 31, 9, 0, tzinfo=UTC)
    now = [t0.timestamp()]
    log = AuditLog(
        tmp_path / "audit",
        keys=AuditKeys.load_or_create(tmp_path / "keys"),
        source="q",
        clock=lambda: now[0],
    )
    log.open()
    for i in range(6):
        now[0] = (t0 + timedelta(hours=i)).timestamp()
        log.submit(
            {
                "type": "request" if i % 2 else "admin",
                "caller": f"u{i % 3}",
                "request_id": f"r{i}",
                "action": "generate" if i % 2 else "drain",
            }
        ).result(timeout=5)
    log.close()
    d = tmp_path / "audit"
    ids = lambda **kw: [r["request_id"] for r in query(d, **kw) if "request_id" in r]  # noqa: E731
    assert ids() == [f"r{i}" for i in range(6)]
    assert ids(since=t0 + timedelta(hours=2), until=t0 + timedelta(hours=4)) == ["r2", "r3"]
    assert ids(since=datetime(2025, 1, 31, 12, 0)) == ["r3", "r4", "r5"]  # naive is UTC
    assert ids(caller="u1") == ["r1", "r4"]
    assert ids(request_id="r5") == ["r5"]
    assert ids(action="drain") == ["r0", "r2", "r4"]
    assert ids(type_="request", caller="u0") == ["r3"]
    assert [r["type"] for r in query(d, type_="open")] == ["open"]
    assert parse_when("30m", now=t0) == t0 - timedelta(minutes=30)
    assert parse_when("7d", now=t0) == t0 - timedelta(days=7)
    assert parse_when("2025-01-31T09:00:00Z") == t0 == parse_when("2025-01-31T09:00:00")
    with pytest.raises(ValueError, match="neither a duration"):
        parse_when("yesterday")


def test_cli_verify_and_query(chain):
    runner = CliRunner()
    ok = runner.invoke(audit_cmd.app, ["verify", str(chain)])
    assert ok.exit_code == 0, ok.output
    assert "chain OK" in ok.stdout and f"records: {len(records(chain))}" in ok.stdout
    as_json = json.loads(runner.invoke(audit_cmd.app, ["verify", str(chain), "-o", "json"]).stdout)
    assert as_json["ok"] and as_json["first_bad"] is None

    found = runner.invoke(
        audit_cmd.app, ["query", str(chain), "--caller", "user2", "--since", "1h", "-o", "json"]
    )
    assert found.exit_code == 0, found.output
    assert [json.loads(x)["request_id"] for x in found.stdout.splitlines()] == [
        f"req-{i:04d}" for i in range(N) if i % 3 == 2
    ]
    table = runner.invoke(audit_cmd.app, ["query", str(chain), "--request-id", "req-0007"])
    assert table.exit_code == 0, table.output
    row = next(x for x in table.stdout.splitlines() if "req-0007" in x)
    assert all(cell in row for cell in ("user1", "clinician", "generate", "OK", "node-a", "107")), (
        row
    )
    assert runner.invoke(audit_cmd.app, ["query", str(chain), "--since", "soon"]).exit_code == 2

    path, line = locate(chain, 58)
    raw = lines(path)
    del raw[line - 1]
    path.write_bytes(b"".join(raw))
    bad = runner.invoke(
        audit_cmd.app,
        ["verify", str(chain), "--public-key", str(default_key_dir(chain) / "signing.pub")],
    )
    assert bad.exit_code == 1
    assert (
        f"FIRST BAD RECORD: seq 58 (file {path.name} line {line}): expected record 58, found 59"
        in bad.stdout
    )
    missing = runner.invoke(
        audit_cmd.app, ["verify", str(chain), "--public-key", str(chain / "nope.pub")]
    )
    assert missing.exit_code == 2 and "nope.pub" in missing.output
