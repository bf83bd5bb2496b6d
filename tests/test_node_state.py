"""The node's state file: operation records are dataclasses in memory and the same JSON on
disk as before (a file written by an older agent still loads, and loads back the same)."""

from __future__ import annotations

import json

import pytest

from node_agent.node_state import STATE_FILE, NodeState, OperationRecord

OLD_FILE = {  # as an agent before OperationRecord wrote it
    "cordoned": True,
    "cordon_reason": "maintenance",
    "drained": False,
    "configured_path": "/m",
    "active": None,
    "previous": None,
    "fencing_token": 7,
    "audit_heads": {},
    "operations": [
        {
            "operation_id": "op-1",
            "kind": "cordon",
            "state": "done",
            "message": "cordoned: no new requests",
            "started": 1.5,
            "finished": 2.5,
        },
        {
            "operation_id": "op-2",
            "kind": "drain",
            "state": "running",
            "message": "",
            "started": 3.0,
            "finished": 0.0,
        },
    ],
}


def test_an_older_file_loads_and_a_running_operation_reads_as_interrupted(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps(OLD_FILE))
    state = NodeState.load(tmp_path)
    assert state.operations[0] == OperationRecord(
        "op-1", "cordon", "done", "cordoned: no new requests", 1.5, 2.5
    )
    interrupted = state.operations[1]
    assert interrupted.state == "failed" and "interrupted" in interrupted.message
    assert state.cordoned and state.fencing_token == 7


def test_the_file_keeps_its_shape(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps(OLD_FILE))
    state = NodeState.load(tmp_path)
    NodeState.write(tmp_path, state.dump())
    again = json.loads((tmp_path / STATE_FILE).read_text())
    assert again.keys() == OLD_FILE.keys()
    assert again["operations"][0] == OLD_FILE["operations"][0]
    assert set(again["operations"][1]) == set(OLD_FILE["operations"][1])


@pytest.mark.parametrize("operations", [["not a record"], [{"kind": "drain"}], 5])
def test_an_altered_operations_list_is_refused_with_the_fix(tmp_path, operations):
    (tmp_path / STATE_FILE).write_text(json.dumps({**OLD_FILE, "operations": operations}))
    with pytest.raises(RuntimeError, match="operations list was altered"):
        NodeState.load(tmp_path)
