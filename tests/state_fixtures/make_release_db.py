"""Makes release-92239ae.db: a coordinator state file written by the stores of the release
before migrations (commit 92239ae: coordinator/api_tokens.py, rollout_store.py,
request_log.py, loaded from git as they were), with synthetic rows the migrations test
reads back after upgrading it (tests/test_state_migrations.py). The bearer secret of the
live token is in release-92239ae.json (synthetic test data).

Made with: .venv/bin/python -m tests.state_fixtures.make_release_db
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

RELEASE = "92239ae"
HERE = Path(__file__).parent
ROOT = HERE.parent.parent
NOW = 1_800_000_000.0


def release_module(name: str):
    source = subprocess.run(
        ["git", "show", f"{RELEASE}:coordinator/{name}.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"release_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"release_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    from cluster.api import fleet_pb2
    from coordinator.request_summary import RequestSummary

    tokens_mod, rollouts_mod, log_mod = (
        release_module(n) for n in ("api_tokens", "rollout_store", "request_log")
    )
    db = HERE / f"release-{RELEASE}.db"
    for p in HERE.glob(db.name + "*"):
        p.unlink()
    tokens = tokens_mod.TokenStore(db, clock=lambda: NOW)
    live, secret = tokens.issue("notes-app", ttl_s=300 * 86400, created_by="operator/alice")
    gone, gone_secret = tokens.issue("old-app", created_by="operator/alice")
    tokens.revoke(gone.id, "rotated")
    tokens.close()

    store = rollouts_mod.RolloutStore(db)
    target = fleet_pb2.RolloutTarget(model_path="/models/m2", weights_digest="sha256:" + "2" * 64)
    for holder in ("co-a@host-a/1111", "co-b@host-b/2222", "co-a@host-a/3333"):
        store.release(store.lease()[0]) if store.lease() else None
        lease = store.acquire(holder, ttl_s=30)
    store.create(
        rollouts_mod.RolloutRow(
            id="r-release",
            state="PAUSED",
            target=target,
            max_unavailable=1,
            drain_timeout_s=30,
            owner=lease.holder,
            started_by="operator/alice",
            nodes=[rollouts_mod.NodeRow("mac-01"), rollouts_mod.NodeRow("mac-02", kept_out=True)],
        )
    )
    store.set_step(
        "r-release",
        rollouts_mod.NodeRow(
            "mac-01", step="done", from_digest="sha256:" + "1" * 64, started=NOW, finished=NOW + 5
        ),
        fence=lease,
    )
    store.close()

    log = log_mod.RequestLog(db, retention_days=100000)
    for i in range(3):
        log.record(
            RequestSummary(
                request_id=f"release-{i}",
                caller="app/notes-app",
                priority="interactive",
                started_at=NOW - 2,
                ended_at=NOW - 1 + i,
                outcome="completed",
                code="OK",
                duration_s=1.0,
                queue_s=0.01,
                ttft_s=0.2,
                decode_s=0.5,
                prompt_tokens=30,
                completion_tokens=11,
                nodes=["mac-01"],
                failovers=0,
                finish_reason="length",
            )
        )
    assert log.flush(10)
    log.close()
    with sqlite3.connect(db) as c:  # one self-contained file
        c.execute("PRAGMA journal_mode=DELETE")
    (HERE / f"release-{RELEASE}.json").write_text(
        json.dumps(
            {
                "release": RELEASE,
                "now": NOW,
                "token": secret,
                "token_id": live.id,
                "revoked_id": gone.id,
                "revoked_token": gone_secret,
                "lease_token": lease.token,
                "lease_holder": lease.holder,
            },
            indent=1,
        )
        + "\n"
    )
    print(db, db.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
