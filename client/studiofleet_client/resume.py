"""Coordinator failover mid-stream: one request's progress, and its continuation elsewhere.

A coordinator's first chunk carries ResumeInfo: the seed the request runs with, the
weights it is pinned to, its whole token budget and the coordinator's id. When the stream
breaks after that (UNAVAILABLE: reset, refused, the coordinator killed), the request is
sent to the next coordinator as its continuation: the token ids received as
prefix_token_ids, the budget less those, the same seed, those weights required, the same
request id, and `resumed_from_coordinator` for that coordinator's audit chain. The node
first sends whatever text of the prefix the caller did not get yet (prefix_text_chars),
so the caller sees each token and each character once. Both clients use one StreamState.
"""

from __future__ import annotations

from typing import Optional

import grpc

from studiofleet_client.api import inference_pb2
from studiofleet_client.errors import FleetError, ResumeImpossibleError, add_context, from_rpc_error

__all__ = ["RESUMABLE", "StreamState"]

# A break the server did not choose: the transport failed or the coordinator went away.
# Anything else mid-stream (ABORTED, DEADLINE_EXCEEDED, CANCELLED, ...) is the answer.
RESUMABLE = frozenset({"UNAVAILABLE"})


class StreamState:
    """What the caller has received of one request (since its last restart) and how to
    continue it on another coordinator; `failovers` counts the coordinators it moved from."""

    def __init__(self, request: inference_pb2.GenerateRequest, *, max_failovers: int):
        self.original = request
        self.request = request  # what the next attempt sends
        self.max_failovers = max_failovers
        self.info: Optional[inference_pb2.ResumeInfo] = None
        self.ids: list[int] = []
        self.text_chars = 0  # code points received
        self.failovers = 0
        self.breaks: list[str] = []  # "coordinator X after N tokens (why)", for messages

    def observe(self, chunk: inference_pb2.GenerateChunk) -> inference_pb2.GenerateChunk:
        """Count a chunk the caller gets; after a failover the final chunk is rewritten to
        describe the whole request (completion tokens, the caller's prefix, the failovers
        and a note naming each break)."""
        if chunk.restarted:  # the coordinator started over on other weights: all before is void
            self.ids.clear()
            self.text_chars = 0
        if chunk.HasField("resume"):
            self.info = inference_pb2.ResumeInfo()
            self.info.CopyFrom(chunk.resume)
        self.ids.extend(chunk.token_ids)
        self.text_chars += len(chunk.text)
        if self.failovers and chunk.HasField("final"):
            f = chunk.final
            f.usage.completion_tokens = len(self.ids)
            f.usage.prefix_tokens = len(self.original.prefix_token_ids)
            f.coordinator_failovers = self.failovers
            note = "resumed after " + "; then after ".join(self.breaks)
            f.message = f"{f.message}; {note}" if f.message else note
        return chunk

    def broke(
        self, err: grpc.RpcError, target: str, targets: list[str], tried: list[str], attempts: int
    ) -> None:
        """The stream broke after chunks arrived: make `request` its continuation, or raise
        the error that says why it cannot be continued."""
        exc = from_rpc_error(
            err,
            target=target,
            request_id=self.original.request_id,
            attempts=attempts,
            targets_tried=tried,
        )
        if exc.code not in RESUMABLE:
            raise exc from None
        n = len(self.ids)
        origin = (
            self.info.coordinator_id
            if self.info is not None and self.info.coordinator_id
            else target
        )
        cause = f"coordinator {origin} at {target} after {n} tokens ({exc.details})"
        why = ""
        if self.info is None:
            why = (
                "the server sent no resume information (a node agent, or a coordinator older than this client); "
                "call a coordinator"
            )
        elif len(targets) < 2:
            why = "the client has no other coordinator address to resume on; give it several"
        elif self.failovers >= self.max_failovers:
            why = f"its coordinator failover budget ({self.max_failovers}) is spent"
        elif self.info.max_tokens <= n:
            why = "every token of its budget had arrived, but not the final chunk"
        if why:
            raise self._impossible(
                f"the stream broke in {cause} and cannot be resumed: {why}",
                target,
                tried,
                attempts,
                exc,
            )
        self.breaks.append(cause)
        self.failovers += 1
        self.request = self._continuation()

    def failed_resume(
        self, exc: FleetError, target: str, tried: list[str], attempts: int
    ) -> FleetError:
        """An attempt to resume it failed for good (no retry left): the error to raise."""
        if not self.failovers:
            return exc
        return self._impossible(
            f"the stream broke in {self.breaks[-1]} and resuming it failed: {exc.details}",
            target,
            tried,
            attempts,
            exc,
        )

    def _impossible(
        self, message: str, target: str, tried: list[str], attempts: int, cause: FleetError
    ) -> ResumeImpossibleError:
        exc = ResumeImpossibleError(
            f"request {self.original.request_id}: {message}; {len(self.ids)} tokens were "
            "delivered and no more will be"
        )
        exc.cause = cause
        return add_context(
            exc,
            target=target,
            request_id=self.original.request_id,
            attempts=attempts,
            targets_tried=tried,
        )

    def _continuation(self) -> inference_pb2.GenerateRequest:
        """The original request continued after the token ids received, as the coordinator
        continues one on another node (coordinator/splice.py)."""
        info, base = self.info, list(self.original.prefix_token_ids)
        r = inference_pb2.GenerateRequest()
        r.CopyFrom(self.original)
        r.prefix_token_ids[:] = base + self.ids
        r.max_tokens = info.max_tokens - len(self.ids)
        r.sampling.seed = info.seed
        r.require_weights_digest = info.weights_digest
        r.resumed_from_coordinator = info.coordinator_id
        if not base:
            r.prefix_text_chars = self.text_chars
        elif self.original.HasField("prefix_text_chars"):
            r.prefix_text_chars = self.original.prefix_text_chars + self.text_chars
        else:  # the caller holds all of its own prefix's text, which only a node can measure
            r.ClearField("prefix_text_chars")
        return r
