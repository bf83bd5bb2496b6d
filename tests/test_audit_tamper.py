"""Tampering with the audit chain: each change is caught at the record it touched (real
files; the chain is a closed 300-record log with signed checkpoints and HEAD)."""

from __future__ import annotations

import json

import pytest

from cluster.audit import AuditError, verify
from cluster.audit.chain import encode_record
from tests.audit_helpers import assert_bad, lines, locate, open_log, records


@pytest.mark.parametrize(
    "field", ["request_id", "prompt_digest", "tokens", "time", "prev", "hash", "seq"]
)
def test_one_byte_flip_keeping_json_valid_is_caught_at_that_record(chain, field):
    path, line = locate(chain, 123)
    raw = lines(path)
    rec = raw[line - 1]
    key = b'"' + field.encode() + b'":'
    value = json.dumps(json.loads(rec)[field], separators=(",", ":")).encode()
    value_end = rec.index(key + value) + len(key) + len(value)
    at = (
        value_end - 1 - value.endswith(b'"')
    )  # its last character: a digit, a hex digit or the Z of a time
    flipped = bytearray(rec)
    flipped[at] = ord("7") if flipped[at] != ord("7") else ord("3")  # a digit/hex stays a digit/hex
    raw[line - 1] = bytes(flipped)
    json.loads(raw[line - 1])  # still valid JSON
    path.write_bytes(b"".join(raw))
    bad = assert_bad(chain, 123, path, line)
    words = {"seq": "seq field was altered", "prev": "prev does not match"}.get(
        field, "hash does not match"
    )
    assert words in bad.reason


def test_flipping_any_byte_of_a_record_is_caught_at_that_record(chain):
    path, line = locate(chain, 200)
    original = path.read_bytes()
    start = sum(len(x) for x in lines(path)[: line - 1])
    end = start + len(lines(path)[line - 1])
    for at in range(start, end):
        data = bytearray(original)
        data[at] ^= 0x01
        path.write_bytes(bytes(data))
        report = verify(chain)
        assert not report.ok, f"flip at byte {at - start} of record 200 not caught"
        assert (report.first_bad.seq_expected, report.first_bad.line) == (200, line), (
            at - start,
            report.first_bad,
        )
    path.write_bytes(original)
    assert verify(chain).ok


def test_deleted_record_is_named(chain):
    path, line = locate(chain, 58)
    raw = lines(path)
    del raw[line - 1]
    path.write_bytes(b"".join(raw))
    bad = assert_bad(chain, 58, path, line)
    assert bad.reason == "expected record 58, found 59: record 58 was deleted or moved"


def test_reordered_records_are_caught_at_the_first(chain):
    path, line = locate(chain, 77)
    raw = lines(path)
    raw[line - 1], raw[line] = raw[line], raw[line - 1]
    path.write_bytes(b"".join(raw))
    assert_bad(chain, 77, path, line, "expected record 77, found 78")


def test_truncation_mid_line_is_caught_not_excused_as_a_crash(chain):
    path, line = locate(chain, 250)
    raw = lines(path)
    path.write_bytes(b"".join(raw[: line - 1]) + raw[line - 1][:40])
    assert_bad(chain, 250, path, line, "cut short", "truncated")


def test_truncation_at_a_line_boundary_names_the_first_missing_record(chain):
    path, line = locate(chain, 250)
    total = len(records(chain))
    path.write_bytes(b"".join(lines(path)[: line - 1]))
    assert_bad(chain, 250, path, line, f"records 250-{total} are missing")
    with pytest.raises(
        AuditError, match=r"audit-000001\.jsonl ends at record 249 .* record " + str(total)
    ):
        open_log(chain)


def test_edit_and_rehash_is_caught_by_the_next_checkpoint_signature(chain):
    path, _ = locate(chain, 120)
    raw = lines(path)
    recs = [json.loads(x) for x in raw]
    recs[119]["outcome"] = "denied"
    prev = recs[118]["hash"]
    for i in range(
        119, len(recs)
    ):  # what a careful forger does: relink and rehash all after the edit
        fields = {k: v for k, v in recs[i].items() if k not in ("seq", "prev", "hash")}
        if fields["type"] == "checkpoint":
            fields["head"] = prev
        recs[i], raw[i] = encode_record(fields, recs[i]["seq"], prev)
        prev = recs[i]["hash"]
    path.write_bytes(b"".join(raw))
    next_checkpoint = next(r["seq"] for r in recs[119:] if r["type"] == "checkpoint")
    assert_bad(
        chain, next_checkpoint, path, next_checkpoint, "checkpoint signature does not verify"
    )


def test_rehashed_last_record_is_caught_by_the_signed_head(chain):
    path, _ = locate(chain, 1)
    raw = lines(path)
    last = json.loads(raw[-1])
    fields = {k: v for k, v in last.items() if k not in ("seq", "prev", "hash")}
    fields["time"] = (
        "2020-01-01T00:00:00.000000Z"  # the checkpoint's signature does not cover its time
    )
    raw[-1] = encode_record(fields, last["seq"], last["prev"])[1]
    path.write_bytes(b"".join(raw))
    assert_bad(chain, last["seq"], path, len(raw), "differs from the one the signed HEAD names")
    head = json.loads((chain / "HEAD").read_text())
    head["hash"] = json.loads(raw[-1])[
        "hash"
    ]  # forging HEAD without the key fails on its signature
    (chain / "HEAD").write_text(json.dumps(head))
    bad = verify(chain).first_bad
    assert bad.file == "HEAD" and "signature does not verify" in bad.reason


# -- rotation ----------------------------------------------------------------------------------


def test_a_line_that_cannot_be_re_encoded_is_a_hash_fault_not_a_crash():
    from cluster.audit.chain import HASH_FAULT, parse_line

    record, fault = parse_line(b'{"seq": 1, "hash": "00", "x": "\\ud800"}\n')
    assert record is not None and fault == HASH_FAULT
