"""The few series the node reads from vLLM's Prometheus /metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VllmMetrics:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    generation_tokens_total: float = 0.0
    prefix_cache_hits_total: float = 0.0  # prompt tokens served from vLLM's prefix cache


# Names across vLLM releases (V0 called the KV cache the "gpu cache" even on CPU).
_SERIES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits_total",
}


def parse_metrics(text: str) -> VllmMetrics:
    """Sum each series over its label sets (one per engine); unknown lines are ignored."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, value = line.partition(" ")
        else:
            value = rest.rpartition("}")[2]
        field = _SERIES.get(name.strip())
        if field is None:
            continue
        try:
            sums[field] = sums.get(field, 0.0) + float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return VllmMetrics(
        running=int(sums.get("running", 0)),
        waiting=int(sums.get("waiting", 0)),
        kv_cache_usage=min(1.0, sums.get("kv_cache_usage", 0.0)),
        generation_tokens_total=sums.get("generation_tokens_total", 0.0),
        prefix_cache_hits_total=sums.get("prefix_cache_hits_total", 0.0),
    )
