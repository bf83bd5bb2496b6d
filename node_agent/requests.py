"""Accepted requests on the event-loop side: token events in, chunks out, one outcome each."""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from cluster.api import inference_pb2
from cluster.logs import fields
from cluster.quality import notes, scoring
from node_agent.engine import EngineEvent, EventKind
from node_agent.stops import StopMatcher
from node_agent.validation import ValidRequest

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    COMPLETED = "completed"  # finished with stop or length
    CANCELLED = "cancelled"  # the caller cancelled, or the node ended it (shutdown)
    DEADLINE = "deadline"  # the caller's deadline passed
    FAILED = "failed"  # the engine failed


class EngineFailed(RuntimeError):
    """The engine reported that it cannot continue this request; `status` (a gRPC status
    name) and `retry_after_ms` when the engine gave them (EngineEvent)."""

    def __init__(self, message: str, status: str = "", retry_after_ms: int = 0):
        super().__init__(message)
        self.status, self.retry_after_ms = status, retry_after_ms


class NodeStopping(RuntimeError):
    """The node ended the request: shutdown past its grace period."""


_FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
}


@dataclass
class Counters:
    accepted: int = 0
    completed: int = 0
    cancelled: int = 0
    deadline: int = 0
    failed: int = 0
    rejected: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0


class RequestStream:
    """One accepted request: buffers engine events and renders them as chunks."""

    def __init__(
        self,
        *,
        key: str,
        req: ValidRequest,
        prompt_len: int,
        detokenizer,
        eos_token_ids: frozenset[int],
        clock: Callable[[], float],
        internal: bool = False,
    ):
        self.key = key
        self.internal = internal
        self.req = req
        self.prompt_len = prompt_len
        self.outcome: Optional[Outcome] = None
        self.admitted = False
        self.finish: Optional[str] = None
        self.engine_done = False  # the engine finished or dropped this request itself
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._clock = clock
        self._detok = detokenizer
        self._eos = eos_token_ids
        self._stops = StopMatcher(req.stop)
        self._events: list[EngineEvent] = []
        self._wake = asyncio.Event()
        self._abort: Optional[BaseException] = None
        self.t_accept = clock()
        self.t_admit: Optional[float] = None
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self.token_gaps: list[float] = []
        for token in req.prefix_token_ids:
            detokenizer.add_token(token)
        primed = detokenizer.last_segment
        # The caller already has the prefix's text, or the first prefix_text_chars of it:
        # the rest (held back by a stop check or an unfinished character) is sent first.
        chars = req.prefix_text_chars
        self._carry = primed[chars:] if chars is not None else ""
        # The whole completion's text (the prefix's included), for the output check and the
        # quality score at the end; it lives only as long as the request.
        self._text: Optional[list[str]] = (
            [primed[:chars] if chars is not None else primed] if req.output is not None else None
        )
        self.quality: Optional[scoring.Score] = None
        self.checked: Optional[notes.Checked] = None

    def push(self, events: list[EngineEvent]) -> None:
        """Events from the engine, timestamped as they reach the event loop."""
        now = self._clock()
        for ev in events:
            if ev.kind is EventKind.ADMITTED:
                self.admitted = True
                self.t_admit = now
                self.cached_tokens = ev.cached_tokens
            elif ev.kind is EventKind.TOKEN and self.finish is None:
                if self.t_last is not None:  # inter-token latency (metrics)
                    self.token_gaps.append(now - self.t_last)
                self.t_first = self.t_first or now
                self.t_last = now
        self._events.extend(events)
        self._wake.set()

    def abort(self, exc: BaseException) -> None:
        """End the stream from the node's side at the next wake-up."""
        self._abort = exc
        self._wake.set()

    @property
    def aborted(self) -> Optional[BaseException]:
        return self._abort

    async def next_chunk(self) -> Optional[inference_pb2.GenerateChunk]:
        """Wait for events; return a chunk (None if nothing to send yet)."""
        await self._wake.wait()
        self._wake.clear()
        if self._abort is not None:
            raise self._abort
        events, self._events = self._events, []
        return self._render(events)

    def _render(self, events: list[EngineEvent]) -> Optional[inference_pb2.GenerateChunk]:
        ids: list[int] = []
        text: list[str] = []
        for ev in events:
            if ev.kind is EventKind.ADMITTED:
                continue
            self.engine_done = (
                self.engine_done or ev.kind is EventKind.FAILED or ev.finish is not None
            )
            if ev.kind is EventKind.FAILED:
                raise EngineFailed(ev.message, ev.status, ev.retry_after_ms)
            if self.finish is not None:  # ended here (stop sequence); the engine is catching up
                continue
            if ev.token >= 0 and not (ev.finish == "stop" and ev.token in self._eos):
                ids.append(ev.token)
                self.completion_tokens += 1
                self._detok.add_token(ev.token)
                if ev.finish is not None:
                    self._detok.finalize()
                delta, matched = self._stops.feed(self._segment())
                text.append(delta)
                if matched:  # ids after the one that completed the stop are never sent
                    self.finish = "stop"
                    continue
            if ev.finish is not None:
                self.finish = ev.finish
                if ev.finish == "stop":
                    self._detok.finalize()
                    text.append(self._stops.feed(self._segment())[0])
                text.append(self._stops.flush())
        if not ids and self.finish is None:
            return None
        delta = "".join(text)
        if self._text is not None:
            self._text.append(delta)
        return inference_pb2.GenerateChunk(text=delta, token_ids=ids)

    def _segment(self) -> str:
        """New decoded text, after any held-back prefix text."""
        segment, self._carry = self._carry + self._detok.last_segment, ""
        return segment

    def node_final(
        self, reason: int, message: str, *, node_id: str, model
    ) -> inference_pb2.GenerateChunk:
        """The last chunk of a stream the node ends itself (shutdown, engine failure)."""
        info = self.final_info(node_id=node_id, model=model, reason=reason)
        info.message = message
        return inference_pb2.GenerateChunk(final=info)

    def timings(self) -> inference_pb2.Timings:
        now = self._clock()
        ms = lambda t: (t - self.t_accept) * 1000.0 if t is not None else 0.0  # noqa: E731
        decode = 0.0
        if self.t_first is not None and self.t_last and self.t_last > self.t_first:
            decode = (self.completion_tokens - 1) / (self.t_last - self.t_first)
        return inference_pb2.Timings(
            queue_wait_ms=ms(self.t_admit),
            time_to_first_token_ms=ms(self.t_first),
            total_ms=(now - self.t_accept) * 1000.0,
            decode_tokens_per_s=decode,
        )

    def _judge(self, info: inference_pb2.FinalInfo) -> None:
        """Check the finished completion against its schema and score it (once)."""
        spec = self.req.output
        if self.checked is None:
            text = "".join(self._text or ())
            self.checked = notes.check_output(spec, text, self.finish or "")
            self.quality = scoring.score_note(spec, self.checked, text, self.finish or "")
            self._text = None
        c = self.checked
        info.structured.CopyFrom(
            inference_pb2.StructuredResult(
                valid=c.valid,
                json=json.dumps(c.value, separators=(",", ":"), ensure_ascii=False)
                if c.valid
                else "",
                rule=c.rule,
                path=c.path,
                error=c.error,
                format=spec.format,
            )
        )
        info.quality.CopyFrom(quality_message(self.quality))

    def final_info(
        self, *, node_id: str, model, reason: Optional[int] = None
    ) -> inference_pb2.FinalInfo:
        info = self._final_info(node_id=node_id, model=model, reason=reason)
        info.template = self.req.template_id
        if self.req.output is not None and reason is None and self.finish is not None:
            self._judge(info)
        return info

    def _final_info(
        self, *, node_id: str, model, reason: Optional[int] = None
    ) -> inference_pb2.FinalInfo:
        return inference_pb2.FinalInfo(
            finish_reason=_FINISH[self.finish] if reason is None else reason,
            usage=inference_pb2.Usage(
                prompt_tokens=self.prompt_len,
                prefix_tokens=len(self.req.prefix_token_ids),
                completion_tokens=self.completion_tokens,
                cached_prompt_tokens=self.cached_tokens,
            ),
            timings=self.timings(),
            node_id=node_id,
            model=model,
            request_id=self.req.request_id,
            seed=self.req.sampling.seed,
        )


def quality_message(score: "scoring.Score") -> inference_pb2.QualityScore:
    return inference_pb2.QualityScore(
        total=score.total,
        rubric=score.rubric,
        parts=[
            inference_pb2.SubScore(name=p.name, score=p.score, weight=p.weight, detail=p.detail)
            for p in score.parts
        ],
    )


class RequestRegistry:
    """The requests in flight on this node, and how every accepted one ended."""

    def __init__(self, *, node_id: str, clock: Callable[[], float] = time.monotonic):
        self._node_id = node_id
        self._clock = clock
        self._streams: dict[str, RequestStream] = {}
        self._by_request_id: dict[str, RequestStream] = {}
        self._seq = itertools.count()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.counters = Counters()
        # Called once per request as it ends: (stream, outcome, now), or (None, None, now)
        # for a rejected one (metrics; never raises into a request).
        self.observers: list[
            Callable[[Optional[RequestStream], Optional[Outcome], float], None]
        ] = []

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def emit_threadsafe(self, batch: list[tuple[str, list[EngineEvent]]]) -> None:
        """The engine's `emit`: hand one step's events to the event loop."""
        self._loop.call_soon_threadsafe(self._dispatch, batch)

    def _dispatch(self, batch: list[tuple[str, list[EngineEvent]]]) -> None:
        for key, events in batch:
            stream = self._streams.get(key)
            if stream is not None:
                stream.push(events)

    def __len__(self) -> int:
        return len(self._streams)

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._by_request_id

    @property
    def running(self) -> int:
        return sum(1 for s in self._streams.values() if s.admitted)

    @property
    def queued(self) -> list[RequestStream]:
        return [s for s in self._streams.values() if not s.admitted]

    def open(
        self,
        req: ValidRequest,
        *,
        prompt_len: int,
        detokenizer,
        eos_token_ids: frozenset[int],
        internal: bool = False,
    ) -> RequestStream:
        """Accept a request; `internal` ones (warm-up) are not counted as traffic."""
        key = f"{req.request_id}#{next(self._seq)}"
        stream = RequestStream(
            key=key,
            req=req,
            prompt_len=prompt_len,
            detokenizer=detokenizer,
            eos_token_ids=eos_token_ids,
            clock=self._clock,
            internal=internal,
        )
        self._streams[key] = stream
        self._by_request_id[req.request_id] = stream
        self._idle.clear()
        if not internal:
            self.counters.accepted += 1
            self.counters.prompt_tokens += prompt_len
        return stream

    def close(self, stream: RequestStream, outcome: Outcome, detail: str = "") -> None:
        """Record the request's one terminal outcome; later calls are ignored."""
        if stream.outcome is not None:
            return
        stream.outcome = outcome
        self._streams.pop(stream.key, None)
        if self._by_request_id.get(stream.req.request_id) is stream:
            del self._by_request_id[stream.req.request_id]
        if not self._streams:
            self._idle.set()
        if stream.internal:
            return
        c = self.counters
        c.tokens_generated += stream.completion_tokens
        if outcome is Outcome.COMPLETED:
            c.completed += 1
        elif outcome is Outcome.CANCELLED:
            c.cancelled += 1
        elif outcome is Outcome.DEADLINE:
            c.deadline += 1
        else:
            c.failed += 1
        t = stream.timings()
        log.info(
            "node=%s request=%s outcome=%s finish=%s prompt_tokens=%d cached_tokens=%d "
            "completion_tokens=%d queue_ms=%.1f ttft_ms=%.1f total_ms=%.1f%s",
            self._node_id,
            stream.req.request_id,
            outcome.value,
            stream.finish or "-",
            stream.prompt_len,
            stream.cached_tokens,
            stream.completion_tokens,
            t.queue_wait_ms,
            t.time_to_first_token_ms,
            t.total_ms,
            f" detail={detail!r}" if detail else "",
            extra=fields(
                event="request.end",
                node_id=self._node_id,
                request_id=stream.req.request_id,
                outcome=outcome.value,
                finish=stream.finish,
                reason=detail,
                prompt_tokens=stream.prompt_len,
                cached_tokens=stream.cached_tokens,
                completion_tokens=stream.completion_tokens,
                queue_ms=round(t.queue_wait_ms, 1),
                ttft_ms=round(t.time_to_first_token_ms, 1),
                total_ms=round(t.total_ms, 1),
                template=stream.req.template_id or None,
                quality=stream.quality.total if stream.quality is not None else None,
                schema_valid=stream.checked.valid if stream.checked is not None else None,
            ),
        )
        self._observe(stream, outcome)

    def reject(self, request_id: str, code: str, message: str) -> None:
        self.counters.rejected += 1
        log.info(
            "node=%s request=%s rejected code=%s reason=%r",
            self._node_id,
            request_id or "-",
            code,
            message,
            extra=fields(
                event="request.rejected",
                node_id=self._node_id,
                request_id=request_id,
                code=code,
                reason=message,
            ),
        )
        self._observe(None, None)

    def _observe(self, stream: Optional[RequestStream], outcome: Optional[Outcome]) -> None:
        now = self._clock()
        for observer in self.observers:
            try:
                observer(stream, outcome, now)
            except Exception:  # noqa: BLE001 - monitoring must never fail a request
                log.exception("node=%s request metrics observer failed", self._node_id)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def abort_all(self, exc_factory: Callable[[RequestStream], BaseException]) -> int:
        streams = list(self._streams.values())
        for s in streams:
            s.abort(exc_factory(s))
        return len(streams)
