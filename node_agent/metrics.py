"""The node agent's Prometheus metrics (docs/monitoring.md).

Request histograms and counters are fed as each request ends (`RequestRegistry`'s
observers: one terminal outcome each, warm-up canaries excluded); the gauges (running,
queued, lifecycle, memory, decode rate, KV cache) are read from the node's own status
when Prometheus scrapes, so they always match `fleetctl node status`.

Every node, whatever its engine, also exports the series names vLLM's server uses
(`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...) with its
`model_name` label, so dashboards and routers written for vLLM read a Mac Studio
unchanged. They are the same observations under a second name, not a second count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster.api import common_pb2, node_pb2
from cluster.metrics import (
    DURATION_BUCKETS,
    ITL_BUCKETS,
    QUEUE_BUCKETS,
    TTFT_BUCKETS,
    NoteMetrics,
    new_registry,
    state_family,
)

if TYPE_CHECKING:
    from node_agent.requests import Outcome, RequestRegistry, RequestStream

Status = Callable[[], node_pb2.NodeStatus]

LIFECYCLES = [
    n.removeprefix("LIFECYCLE_")
    for n in common_pb2.Lifecycle.keys()
    if not n.endswith("UNSPECIFIED")
]


class NodeMetrics:
    def __init__(
        self, *, node_id: str, request_registry: "RequestRegistry", status: Status, engine: str
    ):
        """`status` -> the node's NodeStatus now; `engine` names the configured engine, for
        the info series before a model has loaded."""
        self.registry = new_registry("node", node_id)
        r = self.registry
        self.requests = Counter(
            "studiofleet_node_requests",
            "Requests by outcome (completed, cancelled, deadline, "
            "failed; rejected: never accepted).",
            ["outcome"],
            registry=r,
        )
        self.queue = Histogram(
            "studiofleet_node_request_queue_seconds",
            "Accepted to admitted into the engine's batch.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "studiofleet_node_request_ttft_seconds",
            "Accepted to first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "studiofleet_node_request_inter_token_seconds",
            "Gap between consecutive tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "studiofleet_node_request_duration_seconds",
            "Accepted to the request's end.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "studiofleet_node_prompt_tokens", "Prompt tokens of accepted requests.", registry=r
        )
        self.generation_tokens = Counter(
            "studiofleet_node_generation_tokens", "Tokens generated and sent.", registry=r
        )
        self.notes = NoteMetrics("studiofleet_node", r)
        r.register(_Live(status, engine, self))
        request_registry.observers.append(self.request_ended)

    def request_ended(self, stream: "RequestStream", outcome: "Outcome | None", now: float) -> None:
        """One request's end (outcome None: rejected before it was accepted)."""
        if stream is None:
            self.requests.labels("rejected").inc()
            return
        self.requests.labels(outcome.value).inc()
        self.duration.observe(now - stream.t_accept)
        if stream.t_admit is not None:
            self.queue.observe(stream.t_admit - stream.t_accept)
        if stream.t_first is not None:
            self.ttft.observe(stream.t_first - stream.t_accept)
        for gap in stream.token_gaps:
            self.itl.observe(gap)
        self.prompt_tokens.inc(stream.prompt_len)
        self.generation_tokens.inc(stream.completion_tokens)
        if stream.quality is not None:
            self.notes.observe(
                stream.req.output.format,
                stream.checked.valid,
                stream.quality.total,
                {p.name: p.score for p in stream.quality.parts},
            )


class _Live(Collector):
    """Gauges from the node's status at scrape time (on its event loop), and vLLM's names."""

    def __init__(self, status: Status, engine: str, metrics: NodeMetrics):
        self._status, self._engine, self._metrics = status, engine, metrics

    def collect(self) -> Iterable[Metric]:
        st = self._status()
        yield from self._ours(st)
        yield from _vllm_names(st, self._metrics)

    def _ours(self, st) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "studiofleet_node_requests_running",
            "Requests in the engine's batch.",
            value=st.load.running,
        )
        yield GaugeMetricFamily(
            "studiofleet_node_requests_queued",
            "Accepted requests waiting for a batch slot.",
            value=st.load.queued,
        )
        state = common_pb2.Lifecycle.Name(st.lifecycle).removeprefix("LIFECYCLE_")
        yield state_family(
            "studiofleet_node_state",
            "Lifecycle state (1 for the current).",
            "state",
            LIFECYCLES,
            state,
        )
        yield GaugeMetricFamily(
            "studiofleet_node_cordoned",
            "1 while cordoned (no new requests).",
            value=float(st.cordoned),
        )
        info = GaugeMetricFamily(
            "studiofleet_node_info",
            "What the node serves (value 1).",
            labels=["node", "engine", "model", "version", "digest"],
        )
        info.add_metric(
            [
                st.node_id,
                st.model.engine or self._engine,
                st.model.model_id,
                st.model.version,
                st.model.weights_digest[:19],
            ],
            1.0,
        )
        yield info
        yield GaugeMetricFamily(
            "studiofleet_node_decode_tokens_per_second",
            "Recent aggregate decode rate.",
            value=st.load.decode_tokens_per_s,
        )
        yield GaugeMetricFamily(
            "studiofleet_node_kv_cache_usage_ratio",
            "Share of the engine's KV cache in use "
            "(vLLM engines; 0 on MLX, which has no fixed pool).",
            value=st.load.kv_cache_usage,
        )
        mem = GaugeMetricFamily(
            "studiofleet_node_memory_bytes",
            "Engine memory: active and peak (MLX), Metal's "
            "recommended working set, GPU memory used (vLLM hosts).",
            labels=["kind"],
        )
        mem.add_metric(["engine_active"], float(st.memory.engine_active_bytes))
        mem.add_metric(["engine_peak"], float(st.memory.engine_peak_bytes))
        mem.add_metric(
            ["recommended_working_set"], float(st.memory.gpu_recommended_working_set_bytes)
        )
        mem.add_metric(["gpu_used"], float(sum(g.memory_used_bytes for g in st.memory.gpus)))
        mem.add_metric(["gpu_total"], float(sum(g.memory_total_bytes for g in st.memory.gpus)))
        yield mem
        yield GaugeMetricFamily(
            "studiofleet_node_prompt_cache_bytes",
            "Prompt-prefix caches held in memory.",
            value=float(st.load.prompt_cache_bytes),
        )


VLLM_GAUGES = {  # vllm name -> (help, status getter)
    "vllm:num_requests_running": ("Requests in the batch (vLLM name).", lambda st: st.load.running),
    "vllm:num_requests_waiting": ("Requests waiting (vLLM name).", lambda st: st.load.queued),
    "vllm:kv_cache_usage_perc": (
        "KV cache usage, 0-1 (vLLM name).",
        lambda st: st.load.kv_cache_usage,
    ),
    "vllm:gpu_cache_usage_perc": (
        "KV cache usage, 0-1 (vLLM's name before v0.10).",
        lambda st: st.load.kv_cache_usage,
    ),
}
VLLM_RENAMED = {  # vllm family name -> our family
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:generation_tokens": "generation_tokens",
    "vllm:time_to_first_token_seconds": "ttft",
    "vllm:e2e_request_latency_seconds": "duration",
    "vllm:inter_token_latency_seconds": "itl",
    "vllm:request_queue_time_seconds": "queue",
}


def _vllm_names(st, metrics: NodeMetrics) -> Iterable[Metric]:
    """vLLM's series names over the same observations, labelled with model_name."""
    model = st.model.model_id or "unknown"
    for name, (help_, get) in VLLM_GAUGES.items():
        g = GaugeMetricFamily(name, help_, labels=["model_name"])
        g.add_metric([model], float(get(st)))
        yield g
    for name, attr in VLLM_RENAMED.items():
        for ours in getattr(metrics, attr).collect():
            family = Metric(name, ours.documentation + " (vLLM name)", ours.type)
            for sample in ours.samples:
                family.add_sample(
                    name + sample.name[len(ours.name) :],
                    {**sample.labels, "model_name": model},
                    sample.value,
                )
            yield family
