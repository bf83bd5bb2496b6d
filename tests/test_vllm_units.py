"""Units of the vLLM engine that need no server: metrics, GPU readings, exits, settings.

The real /metrics and server lifecycle are exercised against vLLM in test_vllm_node.py.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from cluster.config import NodeSettings
from node_agent.engines.vllm_metrics import parse_metrics
from node_agent.engines.vllm_server import VllmServer, describe_exit
from node_agent.telemetry import parse_nvidia_smi

# The series as vLLM 0.32 prints them (copied from a real server's /metrics here).
METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.125
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 64.0
vllm:prefix_cache_hits_created{engine="0",model_name="tiny"} 1.795881884099e+09
vllm:generation_tokens_total{engine="0",model_name="tiny"} 1234.0
vllm:request_generation_tokens_bucket{engine="0",le="1.0",model_name="tiny"} 0.0
"""


def test_metrics_are_read_from_vllm_series():
    m = parse_metrics(METRICS)
    assert (m.running, m.waiting) == (3, 2)
    assert m.kv_cache_usage == 0.125
    assert m.generation_tokens_total == 1234.0 and m.prefix_cache_hits_total == 64.0


def test_metrics_sum_engines_and_accept_the_older_cache_name():
    text = (
        'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} 2\n'
        "vllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_waiting garbage\nnot_vllm 9\n"
    )
    m = parse_metrics(text)
    assert m.running == 3 and m.kv_cache_usage == 0.5 and m.waiting == 0


def test_nvidia_smi_rows_become_gpu_readings():
    # A fake: nvidia-smi cannot run on these CPU machines; this is its documented CSV
    # (--format=csv,noheader,nounits), MiB and percent.
    rows = parse_nvidia_smi(
        "0, NVIDIA A100-SXM4-80GB, 40960, 81920, 87\n1, NVIDIA A100-SXM4-80GB, 1024, 81920, [N/A]\n"
        "garbage line\n"
    )
    assert [(g.index, g.memory_used_bytes, g.memory_total_bytes, g.utilization) for g in rows] == [
        (0, 40960 << 20, 81920 << 20, 0.87),
        (1, 1024 << 20, 81920 << 20, 0.0),
    ]
    assert rows[0].name == "NVIDIA A100-SXM4-80GB"


def test_exits_are_described_by_signal_or_code():
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


def test_the_server_command_pins_loopback_and_passes_extra_arguments(tmp_path):
    server = VllmServer(
        python="/opt/vllm/bin/python", extra_args=["--dtype", "bfloat16"], state_dir=tmp_path
    )
    server.port = 8123
    cmd = server.command(Path("/models/q"), "qwen", max_model_len=4096, max_num_seqs=32)
    assert cmd[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--max-num-seqs") + 1] == "32" and cmd[-2:] == ["--dtype", "bfloat16"]


def test_vllm_args_come_as_a_shell_string_or_a_list(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIOFLEET_NODE_VLLM_ARGS", "--dtype float16 --quantization 'awq marlin'")
    assert NodeSettings(model_path=tmp_path).vllm_args == (
        "--dtype",
        "float16",
        "--quantization",
        "awq marlin",
    )
    monkeypatch.delenv("STUDIOFLEET_NODE_VLLM_ARGS")
    assert NodeSettings(model_path=tmp_path, vllm_args=["--enforce-eager"]).vllm_args == (
        "--enforce-eager",
    )


def test_an_unknown_engine_is_refused_with_the_choices(tmp_path):
    from node_agent.main import engine_problem

    problem = engine_problem(NodeSettings(model_path=tmp_path, engine="tensorrt"))
    assert "unknown engine 'tensorrt'" in problem and "mlx, vllm" in problem


def test_a_python_without_vllm_is_refused_with_the_fix(tmp_path):
    from node_agent.main import engine_problem

    problem = engine_problem(
        NodeSettings(model_path=tmp_path, engine="vllm")
    )  # the test venv has no vLLM
    assert problem is not None and "has no vllm package" in problem and "--vllm-python" in problem


@pytest.mark.parametrize("leader", ["vllm", "sleep"])
def test_only_a_stale_group_that_runs_vllm_is_killed(tmp_path, leader):
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", leader], start_new_session=True
    )
    try:
        (tmp_path / "vllm-server.pid").write_text(str(proc.pid))
        VllmServer(python=sys.executable, state_dir=tmp_path).kill_stale()
        if leader == "vllm":
            assert proc.wait(timeout=10) == -signal.SIGKILL
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
        assert not (tmp_path / "vllm-server.pid").exists()
    finally:
        proc.kill()
        proc.wait()


def test_streamed_chunks_become_token_events_and_failures_name_no_text():
    from node_agent.engine import EventKind
    from node_agent.engines.vllm_protocol import chunk_events

    events, done, failure = chunk_events(
        {"choices": [{"token_ids": [5, 6], "finish_reason": None}]}
    )
    assert [(e.kind, e.token, e.finish) for e in events] == [
        (EventKind.TOKEN, 5, None),
        (EventKind.TOKEN, 6, None),
    ]
    assert (done, failure) == (False, None)
    events, done, _ = chunk_events({"choices": [{"token_ids": [2], "finish_reason": "stop"}]})
    assert [(e.token, e.finish) for e in events] == [(2, "stop")] and done
    events, done, _ = chunk_events({"choices": [{"token_ids": [], "finish_reason": "length"}]})
    assert [(e.token, e.finish) for e in events] == [(-1, "length")] and done
    assert chunk_events({"choices": [], "usage": {"completion_tokens": 3}}) == ([], False, None)
    _, done, failure = chunk_events(
        {"error": {"type": "BadRequestError", "message": "ZZ-SYNTHETIC-PATIENT quoted"}}
    )
    assert done and failure == "the vLLM server failed the request, BadRequestError"
    _, done, failure = chunk_events({"choices": [{"token_ids": [], "finish_reason": "abort"}]})
    assert done and "(abort)" in failure
