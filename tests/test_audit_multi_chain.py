"""Several audit chains, one per coordinator: `fleetctl audit query A B` interleaves their
records by time, each naming its chain, so a request coordinator B resumed after A died
reads as one story; `fleetctl audit verify A B` checks each chain on its own and names the
one that fails. Real chains written by AuditLog (real files, fsync, signatures), with the
coordinator's own record builders (coordinator/records.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from typer.testing import CliRunner

from cluster.audit import AuditKeys, AuditLog, query_chains, verify
from cluster.audit.chain import default_key_dir
from cluster.fleetctl import audit_cmd
from coordinator.records import Caller, Hop, RequestRecord, Resumed
from coordinator.request_summary import Outcome
from tests.audit_helpers import lines, locate

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
HOP = Hop("node-1", "tiny@v1", "sha256:aa")


def _chain(directory, coordinator: str, entries: list[tuple[float, dict]]) -> None:
    """Write `entries` ((seconds after T0, record), in order) as `coordinator`'s chain."""
    now = [T0.timestamp()]
    log = AuditLog(
        directory,
        keys=AuditKeys.load_or_create(default_key_dir(directory)),
        source=coordinator,
        clock=lambda: now[0],
    )
    log.open()
    try:
        for at, record in entries:
            now[0] = (T0 + timedelta(seconds=at)).timestamp()
            log.submit(record).result(timeout=5)
    finally:
        log.close()


def _record(
    coordinator: str, request_id: str, outcome: str, resumed: Resumed | None = None
) -> dict:
    who = Caller("alice", "app", "ipv4:127.0.0.1:5", coordinator)
    base = RequestRecord(who, request_id, prompt_digest="hmac:ab", resumed=resumed)
    return (
        base.accepted(HOP) if outcome == "accepted" else base.ended(Outcome.COMPLETED, "OK")
    ).to_dict()


def _two_chains(tmp_path):
    """co-a accepts r-1 and r-2 and finishes r-1, then dies mid-stream of r-2; co-b finishes
    r-3 and takes r-2 over after 7 tokens."""
    a, b = tmp_path / "co-a", tmp_path / "co-b"
    _chain(
        a,
        "co-a",
        [
            (1, _record("co-a", "r-1", "accepted")),
            (2, _record("co-a", "r-2", "accepted")),
            (3, _record("co-a", "r-1", "completed")),
        ],
    )  # killed here: r-2 never ends on co-a
    resumed = Resumed("co-a", 7)
    _chain(
        b,
        "co-b",
        [
            (1.5, _record("co-b", "r-3", "accepted")),
            (2.5, _record("co-b", "r-3", "completed")),
            (4, _record("co-b", "r-2", "accepted", resumed)),
            (5, _record("co-b", "r-2", "completed", resumed)),
        ],
    )
    return a, b


def test_query_merges_chains_by_time_and_names_each_record_chain(tmp_path):
    a, b = _two_chains(tmp_path)
    merged = query_chains([a, b], type_="request")
    assert [(r["chain"], r["coordinator"], r["request_id"], r["outcome"]) for r in merged] == [
        (str(a), "co-a", "r-2", "accepted"),  # 2 s; never ended on co-a, so it stands as it is
        (
            str(b),
            "co-b",
            "r-3",
            "completed",
        ),  # 2.5 s; its accepted record folded into the end record
        (str(a), "co-a", "r-1", "completed"),  # 3 s
        (str(b), "co-b", "r-2", "completed"),  # 5 s: the resumed request's end on co-b
    ]
    times = [r["time"] for r in merged]
    assert times == sorted(times), times
    assert {r["request_id"] for r in merged} == {"r-1", "r-2", "r-3"} and len(merged) == 4

    story = query_chains([a, b], request_id="r-2")
    assert [(r["coordinator"], r["outcome"]) for r in story] == [
        ("co-a", "accepted"),
        ("co-b", "completed"),
    ]
    assert "resumed_from" not in story[0]
    assert story[1]["resumed_from"] == "co-a" and story[1]["resumed_after_tokens"] == 7
    assert (
        story[1]["accepted_time"] < story[1]["time"]
        and story[0]["time"] < story[1]["accepted_time"]
    )
    # The order of the directories does not change the order of the records, only ties.
    assert [r["time"] for r in query_chains([b, a], request_id="r-2")] == [r["time"] for r in story]


def test_cli_query_several_directories_shows_one_request_across_coordinators(tmp_path):
    a, b = _two_chains(tmp_path)
    runner = CliRunner()
    got = runner.invoke(
        audit_cmd.app, ["query", str(a), str(b), "--request-id", "r-2", "-o", "json"]
    )
    assert got.exit_code == 0, got.output
    rows = [json.loads(x) for x in got.stdout.splitlines()]
    assert [(r["chain"], r["coordinator"], r["outcome"], r.get("resumed_from")) for r in rows] == [
        (str(a), "co-a", "accepted", None),
        (str(b), "co-b", "completed", "co-a"),
    ]
    table = runner.invoke(audit_cmd.app, ["query", str(a), str(b), "--request-id", "r-2"])
    assert table.exit_code == 0, table.output
    body = [
        [cell.strip() for cell in x.split("│")[1:-1]]
        for x in table.stdout.splitlines()
        if "r-2" in x
    ]
    assert [(row[0], row[1], row[9], row[-2], row[-1]) for row in body] == [
        ("co-a", "co-a", "accepted", "-", "-"),
        ("co-b", "co-b", "completed", "co-a", "7"),
    ], body
    # One directory: exactly as before, no chain column, chain order.
    single = runner.invoke(audit_cmd.app, ["query", str(a), "--request-id", "r-2", "-o", "json"])
    assert [json.loads(x) for x in single.stdout.splitlines()] == [
        {k: v for k, v in rows[0].items() if k != "chain"}
    ]
    assert "chain" not in runner.invoke(audit_cmd.app, ["query", str(a)]).stdout.splitlines()[1]
    missing = runner.invoke(audit_cmd.app, ["query", str(a), str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "nope" in missing.output


def test_verify_checks_each_chain_and_names_the_tampered_one(tmp_path):
    a, b = _two_chains(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(audit_cmd.app, ["verify", str(a), str(b)])
    assert ok.exit_code == 0, ok.output
    assert f"chain {a}:" in ok.stdout and f"chain {b}:" in ok.stdout and "2 chains OK" in ok.stdout
    assert ok.stdout.count("  chain OK") == 2

    path, line = locate(b, 3)  # co-b's r-3 completed record: flip its outcome, keep the JSON valid
    raw = lines(path)
    raw[line - 1] = raw[line - 1].replace(b'"completed"', b'"cancelled"')
    path.write_bytes(b"".join(raw))
    assert verify(a).ok and not verify(b).ok

    bad = runner.invoke(audit_cmd.app, ["verify", str(a), str(b)])
    assert bad.exit_code == 1, bad.output
    assert f"1 of 2 chains FAILED: {b}" in bad.stdout
    text = bad.stdout.split(f"chain {b}:")
    assert (
        "chain OK" in text[0]
        and f"FIRST BAD RECORD: seq 3 (file {path.name} line {line})" in text[1]
    )
    as_json = json.loads(
        runner.invoke(audit_cmd.app, ["verify", str(a), str(b), "-o", "json"]).stdout
    )
    assert not as_json["ok"] and as_json["failed"] == [str(b)]
    assert [(c["chain"], c["ok"]) for c in as_json["chains"]] == [(str(a), True), (str(b), False)]
    assert as_json["chains"][1]["first_bad"]["seq_expected"] == 3
    # Each --public-key goes with its directory; a count that matches neither is refused.
    swapped = runner.invoke(
        audit_cmd.app,
        ["verify", str(a), str(b), "--public-key", str(default_key_dir(b) / "signing.pub")],
    )
    assert swapped.exit_code == 2 and "--public-key" in swapped.output
    assert runner.invoke(audit_cmd.app, ["verify", str(a), str(b), "--min-seq", "3"]).exit_code == 2
