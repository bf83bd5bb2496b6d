"""Tamper-evident, durable audit trail (HIPAA 164.312(b), NIST 800-53 AU-3/AU-9/AU-10).

`AuditLog` appends records to a sha256 hash chain in JSON Lines files, with signed
checkpoints and a signed HEAD; `verify()` checks a chain and names the first bad record;
`query()` searches records. Records say who, what, when, where, source and outcome, never
content: callers put keyed digests (`AuditKeys.digest`) where a value must be matched.

Fields callers conventionally set (the log interprets only `type`): `caller`, `role`,
`action`, `request_id`, `outcome`, `code`, `nodes`, `tokens`.

Exceptions: AuditError (cannot open, read or trust a log) > AuditWriteError (a record was
not made durable). Malformed records raise ValueError or TypeError at submit().
"""

from cluster.audit.chain import AuditError, AuditWriteError, Problem, VerifyReport, verify
from cluster.audit.keys import AuditKeys, KeyedDigest, load_public_key
from cluster.audit.log import AuditLog, AuditStats
from cluster.audit.query import parse_when, query, query_chains

__all__ = [
    "AuditError",
    "AuditKeys",
    "AuditLog",
    "AuditStats",
    "AuditWriteError",
    "KeyedDigest",
    "Problem",
    "VerifyReport",
    "load_public_key",
    "parse_when",
    "query",
    "query_chains",
    "verify",
]
