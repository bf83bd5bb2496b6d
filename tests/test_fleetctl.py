"""fleetctl as an operator runs it: make a model, smoke-test a node, read its status."""

from __future__ import annotations

import json
import subprocess
import sys

from cluster.localfleet import HARNESS_NODE_CALLER
from tests.procs import ROOT, NodeProcess

# `generate --node`: straight to a node agent, which serves coordinators only.
AT_NODE = ("--node", "--tls-name", HARNESS_NODE_CALLER)


def fleetctl(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "cluster.fleetctl.app", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_make_tiny_then_generate_json_and_status(tmp_path):
    out = fleetctl(
        "model",
        "make-tiny",
        str(tmp_path / "m"),
        "--hidden",
        "64",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--layers",
        "1",
        "--vocab",
        "400",
        "--seed",
        "3",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["spec"]["hidden_size"] == 64
    with NodeProcess(tmp_path / "m", node_id="cli-node") as node:
        node.start(tmp_path / "logs")
        node.wait_serving()
        res = fleetctl(
            "generate",
            *AT_NODE,
            "--target",
            node.address,
            "--prompt",
            "Write a note",
            "--max-tokens",
            "12",
            "--seed",
            "4",
            "--temperature",
            "0.5",
            "-o",
            "json",
        )
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["node_id"] == "cli-node"
        assert doc["completion_tokens"] == len(doc["token_ids"]) <= 12
        assert doc["weights_digest"].startswith("sha256:")
        assert doc["time_to_first_token_ms"] > 0
        # `fleetctl model digest` gives the digest the node reports for the same files.
        digest = fleetctl("model", "digest", str(tmp_path / "m"))
        assert digest.returncode == 0 and digest.stdout.strip() == doc["weights_digest"]

        streamed = fleetctl(
            "generate",
            *AT_NODE,
            "--target",
            node.address,
            "--prompt",
            "Write a note",
            "--max-tokens",
            "12",
            "--seed",
            "4",
            "--temperature",
            "0.5",
        )
        assert streamed.returncode == 0
        assert streamed.stdout == doc["text"]
        assert "on cli-node" in streamed.stderr

        piped = subprocess.run(
            [
                sys.executable,
                "-m",
                "cluster.fleetctl.app",
                "generate",
                *AT_NODE,
                "--target",
                node.address,
                "--prompt-file",
                "-",
                "--max-tokens",
                "12",
                "--seed",
                "4",
                "--temperature",
                "0.5",
            ],
            input="Write a note",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert piped.returncode == 0 and piped.stdout == doc["text"]  # stdin: nothing in argv
        bad = fleetctl(
            "generate", *AT_NODE, "--target", node.address, "--prompt", "x", "--max-tokens", "0"
        )
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr

        status = fleetctl(
            "node", "status", "--tls-name", "operator", "--target", node.address, "-o", "json"
        )
        assert json.loads(status.stdout)["lifecycle"] == "LIFECYCLE_READY"
        table = fleetctl("node", "status", "--tls-name", "operator", "--target", node.address)
        assert "READY" in table.stdout and "cli-node" in table.stdout

    gone = fleetctl(
        "node", "status", "--tls-name", "operator", "--target", node.address, "--timeout-s", "2"
    )
    assert gone.returncode == 3 and "UNAVAILABLE" in gone.stderr


def test_model_digest_refuses_what_is_not_a_model(tmp_path):
    missing = fleetctl("model", "digest", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    empty = fleetctl("model", "digest", str(tmp_path))
    assert empty.returncode == 2 and "has no model files" in empty.stderr
    bad = fleetctl("model", "digest", str(tmp_path), "-o", "yaml")
    assert bad.returncode == 2 and "--output" in bad.stderr
