"""The standard benchmark client against the front door (issue 20): vLLM's own `vllm bench
serve`, from the vLLM environment the tests already install, with its default random
dataset (which forces ignore_eos). Real client, real coordinator, real node agent."""

from __future__ import annotations

import json
import os
import subprocess

import grpc

from cluster.api import fleet_pb2, fleet_pb2_grpc
from cluster.client import build_request
from tests.fleet_helpers import collect
from tests.procs import ROOT

PROMPTS, OUTPUT_LEN = 8, 24


def test_vllm_bench_serve_runs_against_the_front_door_and_ignore_eos_is_honoured(
    start_node, start_coordinator, tiny_model, vllm_python, tmp_path
):
    node = start_node(node_id="bench-node")
    co = start_coordinator(nodes=[node.address])
    co.wait_routable(1)
    token = (
        fleet_pb2_grpc.FleetStub(co.channel)
        .IssueApiToken(fleet_pb2.IssueApiTokenRequest(name="vllm-bench", ttl_s=3600), timeout=10)
        .secret
    )
    env = {
        **os.environ,
        "OPENAI_API_KEY": token,
        "SSL_CERT_FILE": str(co.tls_dir / "ca.pem"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    base = co.openai_base_url.removesuffix("/v1")
    out = subprocess.run(
        [
            vllm_python,
            str(ROOT / "tests" / "vllm_bench_cli.py"),
            "bench",
            "serve",
            "--backend",
            "openai",
            "--base-url",
            base,
            "--model",
            tiny_model.name,
            "--tokenizer",
            str(tiny_model),
            "--dataset-name",
            "random",
            "--random-input-len",
            "32",
            "--random-output-len",
            str(OUTPUT_LEN),
            "--num-prompts",
            str(PROMPTS),
            "--max-concurrency",
            "4",
            "--seed",
            "3",
            "--disable-tqdm",
            "--save-result",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "bench.json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == PROMPTS and result.get("failed", 0) == 0, result
    # ignore_eos: every request generated its whole budget, whatever the model sampled.
    assert result["total_output_tokens"] == PROMPTS * OUTPUT_LEN, result
    assert "Successful requests" in out.stdout


def test_ignore_eos_generates_to_max_tokens_and_is_refused_with_a_schema(
    start_node, start_coordinator
):
    node = start_node(node_id="eos-node")
    co = start_coordinator(nodes=[node.address])
    co.wait_routable(1)
    req = build_request(prompt="Plan:", max_tokens=300, temperature=0.0)
    req.sampling.ignore_eos = True
    s = collect(co.inference, req)
    assert s.final is not None and s.final.usage.completion_tokens == 300
    noted = build_request(prompt="Synthetic visit.", note_template="soap-brief", max_tokens=50)
    noted.sampling.ignore_eos = True
    refused = collect(co.inference, noted)
    assert refused.error is not None and refused.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ignore_eos" in refused.error.details()


def test_ignore_eos_reaches_a_vllm_node(vllm_node, as_node_caller):
    """The vLLM engine passes ignore_eos on (and no EOS stop ids): the budget is generated."""
    req = build_request(prompt="Plan:", max_tokens=64, temperature=0.0)
    req.sampling.ignore_eos = True
    s = collect(vllm_node.inference, req)
    assert s.final is not None and s.final.usage.completion_tokens == 64
