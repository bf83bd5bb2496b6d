"""One request's progress across nodes: what the caller has received, and what to ask next."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from cluster.api import inference_pb2


@dataclass(frozen=True)
class Voided:
    """What one restart discarded: counts and a keyed digest, never the text."""

    node: str  # the node that failed
    digest: str  # the weights the voided tokens came from
    tokens: int
    completion_digest: str  # keyed digest of the voided text ("" with audit off)
    why: str  # why it could not be resumed


class Splice:
    """Token ids and text already delivered, the nodes used, the weights it is pinned to."""

    def __init__(
        self,
        request: inference_pb2.GenerateRequest,
        *,
        clock: Callable[[], float],
        completion_digest=None,
    ):
        self.request = request
        self.completion_digest = completion_digest  # keyed digest of the text, fed as it passes
        self._clock = clock
        self.t_accept = clock()
        self.t_first = 0.0
        self.t_last = 0.0
        self.base_prefix = list(request.prefix_token_ids)
        self.delivered: list[int] = []
        self.text_chars = 0
        self.digest = request.require_weights_digest
        self.nodes: list[str] = []
        self.hops: list[tuple[str, str, str]] = []  # (node, model@version, weights digest) per hop
        self.excluded: set[str] = set()
        self.last_failure = None  # the status code of the last failed node call, if any
        self.failovers = 0  # moves after the first token
        self.retries = 0  # moves before it
        self.restarts = 0  # times it started over on other weights (allow_restart)
        self.voided: list[Voided] = []
        self.notes: list[str] = []  # for the final chunk's message
        self.restart_pending = False  # the next chunk forwarded carries `restarted`
        self.announce_restart = False  # the next routing is the restart's (one event)
        self._pinning = ""
        self.t_routed = 0.0
        self.ended: Optional[inference_pb2.FinalInfo] = (
            None  # the final record sent (quality, template)
        )
        self.queue_s: Optional[float] = None  # time spent waiting for a node, over every hop
        self.token_gaps: list[float] = []
        self._resume_sent = False  # the caller has this run's ResumeInfo (coordinator failover)

    @property
    def remaining(self) -> int:
        return self.request.max_tokens - len(self.delivered)

    def request_for_node(self, node_digest: str) -> inference_pb2.GenerateRequest:
        """The request for a node serving `node_digest`: the original (pinned to the weights
        the router chose, so a stale fleet view fails fast), or its continuation after the
        tokens already delivered."""
        r = inference_pb2.GenerateRequest()
        r.CopyFrom(self.request)
        r.require_weights_digest = self.digest or node_digest
        r.session_key = ""  # routing only; nodes have no use for it
        r.allow_restart = False  # the coordinator's decision, not the node's
        r.resumed_from_coordinator = ""  # the audit's, not the node's
        if not self.delivered:
            return r
        r.prefix_token_ids[:] = self.base_prefix + self.delivered
        r.max_tokens = self.remaining
        if not self.base_prefix:
            r.prefix_text_chars = self.text_chars
        elif self.request.HasField("prefix_text_chars"):
            r.prefix_text_chars = self.request.prefix_text_chars + self.text_chars
        else:  # the caller holds all of its own prefix's text, which only a node can measure
            r.ClearField("prefix_text_chars")
        return r

    def routed(self, node_id: str, digest: str, model: str = "") -> None:
        self.t_routed = self.t_routed or self._clock()
        if not self.nodes or self.nodes[-1] != node_id:
            self.nodes.append(node_id)
            self.hops.append((node_id, model, digest))
        self._pinning = digest

    def absorb(self, chunk: inference_pb2.GenerateChunk) -> int:
        """Count what this chunk delivers; returns its number of tokens."""
        n = len(chunk.token_ids)
        if n:
            now = self._clock()
            if not self.delivered:
                self.t_first = now
                self.digest = self.digest or self._pinning  # pinned from the first token on
            else:  # inter-token latency as the caller sees it: a chunk of n tokens is n gaps
                self.token_gaps.extend([(now - self.t_last) / n] * n)
            self.delivered.extend(chunk.token_ids)
            self.t_last = now
        self.text_chars += len(chunk.text)
        if self.completion_digest is not None and chunk.text:
            self.completion_digest.update(chunk.text.encode())
        return n

    def stamp_resume(self, chunk: inference_pb2.GenerateChunk, coordinator_id: str) -> None:
        """Put on the first chunk sent (and the first after a restart) what a client needs to
        resume the stream on another coordinator: seed, weights, budget, this coordinator."""
        if self._resume_sent:
            return
        self._resume_sent = True
        info = chunk.resume
        info.seed = self.request.sampling.seed
        info.weights_digest = self.digest or self._pinning
        info.max_tokens = self.request.max_tokens
        info.coordinator_id = coordinator_id

    def restart_refusal(self) -> str:
        """Why this request may not start over on other weights ("" if it may)."""
        if not self.request.allow_restart:
            return "the caller did not allow a restart on other weights (allow_restart)"
        if self.request.require_weights_digest:
            return "the caller required these weights (require_weights_digest), so it was not restarted elsewhere"
        if self.base_prefix:
            return (
                "it continues the caller's own prefix_token_ids, so it was not restarted elsewhere"
            )
        return ""

    def restart(self, why: str, completion_digest=None) -> Voided:
        """Start over from the beginning on any weights: everything the caller was sent is
        void. The failed node stays excluded; `completion_digest` is a fresh keyed digest
        for the text the caller will keep."""
        voided = Voided(
            self.nodes[-1] if self.nodes else "",
            self.digest,
            len(self.delivered),
            self.completion_digest.hexdigest_str() if self.completion_digest else "",
            why,
        )
        self.voided.append(voided)
        self.restarts += 1
        self.delivered = []
        self.text_chars = 0
        self.digest = ""
        self.t_first = self.t_last = 0.0
        self.completion_digest = completion_digest
        self.restart_pending = self.announce_restart = True
        self._resume_sent = False  # the restarted run is pinned to other weights
        return voided

    def mark_restarted(
        self, chunk: inference_pb2.GenerateChunk, node_id: str, node_digest: str
    ) -> None:
        """Flag the first chunk forwarded after a restart, and say so in the final message."""
        if not self.restart_pending:
            return
        self.restart_pending = False
        chunk.restarted = True
        v = self.voided[-1]
        self.notes.append(
            f"restarted from the beginning on node {node_id} (weights {node_digest[:19]}) after "
            f"node {v.node} failed: {v.why}; the tokens sent before ({v.tokens}) were discarded"
        )

    def failed(self, node_id: str) -> None:
        self.excluded.add(node_id)
        if self.delivered:
            self.failovers += 1
        else:
            self.retries += 1

    def elapsed_ms(self) -> float:
        return (self._clock() - self.t_accept) * 1000.0

    def final(self, chunk: inference_pb2.GenerateChunk) -> inference_pb2.GenerateChunk:
        """The node's final chunk, rewritten to describe the whole request."""
        out = inference_pb2.GenerateChunk()
        out.CopyFrom(chunk)
        f = out.final
        f.usage.completion_tokens = len(self.delivered)
        f.usage.prefix_tokens = len(self.base_prefix)
        f.failovers = self.failovers
        f.nodes[:] = self.nodes
        f.restarts = self.restarts
        if self.notes:
            f.message = "; ".join([f.message, *self.notes] if f.message else self.notes)
        t = f.timings
        t.queue_wait_ms += (
            self.t_routed - self.t_accept
        ) * 1000.0  # the coordinator's queue, then the node's
        t.time_to_first_token_ms = (self.t_first - self.t_accept) * 1000.0 if self.t_first else 0.0
        t.total_ms = self.elapsed_ms()
        span = self.t_last - self.t_first
        t.decode_tokens_per_s = (len(self.delivered) - 1) / span if span > 0 else 0.0
        self.ended = f
        return out
