"""The MLX engine of one rank in a node group (docs/node-groups.md).

Every rank runs the same engine loop on its own shard. Rank 0 takes requests; at each loop
turn it shares what it took (new requests' tokens and sampling, cancels, loads, close) with
the other ranks through the collective, so every rank inserts, removes and steps the same
way and the model's collectives line up. The same collective compares a running hash of what
each rank sampled (token parity), and a step's tokens leave rank 0 only once all agreed: a
rank that differs fails the group.

Every collective of ours runs on mlx-lm's generation stream, the one the model's own run on:
on another stream it could interleave with the look-ahead step mlx-lm leaves in flight and
mix collectives across machines (wrong logits, nothing logged). A failure (a collective
error, a rank silent past --group-timeout-s, a step stuck that long) ends every in-flight
request with a failure naming the rank, and the process exits with GROUP_FAILED_EXIT_CODE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

from cluster.api import node_pb2
from cluster.digest import DIGEST_FORMAT
from cluster.validation import Sampling
from node_agent.engine import EngineClosed, EngineEvent, EngineRequest, EventKind
from node_agent.engines.mlx_engine import MlxEngine
from node_agent.group import (
    GROUP_FAILED_EXIT_CODE,
    GroupSpec,
    die_with_parent,
    form,
    layout_digest,
)
from node_agent.group_heartbeat import Heartbeat
from node_agent.telemetry import host_memory

log = logging.getLogger(__name__)

LOAD_FACTOR = 60  # until the group has loaded, a collective may wait 60x --group-timeout-s
EXIT_AFTER_S = 3.0  # FAILED stays visible (GetStatus) this long before the process exits
_HASH_PARTS = 3  # the 63-bit parity hash as three 21-bit int32 parts (all_sum stays exact)
_PARITY_DIFFERS = (
    "sampled other tokens than rank 0 (token-parity check); its shard or software differs"
)


class GroupFailed(RuntimeError):
    """The group cannot go on; the message names the rank and the cause."""


class NotOnEveryRank(FileNotFoundError):
    """A model to load is missing on some rank: no rank switches."""


class GroupMlxEngine(MlxEngine):
    def __init__(self, *, group: GroupSpec, staging_root: Optional[Path] = None, **kwargs):
        super().__init__(**kwargs)
        self._staging = staging_root  # a follower finds its own staged copies here
        self._paths: dict[str, Path] = {}  # a follower: rank 0's model path -> its own copy
        self.model_digest = ""  # the model's own digest (staged and activated by it)
        self.group_spec = group
        self.follower = group.rank > 0
        self._group = None
        self._heartbeat: Optional[Heartbeat] = None
        self._failed = ""
        self._failed_rank: Optional[int] = None
        self._fail_lock = threading.Lock()
        self._busy_since = 0.0  # when the engine thread entered a collective or a step
        self._busy_what = ""
        self._parity = hashlib.blake2b(digest_size=8)
        self._raw_emit = None
        self._grammars = None  # a follower's, for schema-constrained requests
        self._held: Optional[list] = None  # the events of the step under way
        self._pending: list = []  # events not sent until the ranks agreed on them
        self._parked: list[Future] = []  # a follower's load() calls, answered by rank 0's load
        self._loaded = None  # a follower's last load: ModelFacts or the exception
        # A follower's agent: (op_id, source, model_id, version, expected) -> stage it there;
        # and how the stages it was passed went ({op_id: [state, message]}), for its heartbeat.
        self.on_stage = None
        self.stage_report = dict
        die_with_parent()

    # -- called from other threads -------------------------------------------------

    def start(self, emit, on_exit=None, on_serving=None) -> None:
        self._raw_emit = emit if not self.follower else (lambda batch: None)

        def counted(batch):
            for key, events in batch:
                for e in events:
                    part = f"{key}|{e.kind.value}|{e.token}|{e.finish}|{e.cached_tokens};"
                    self._parity.update(part.encode())
            if self._held is not None:
                self._held.extend(batch)  # a step's tokens
            elif self._pending:
                self._pending.extend(batch)  # keep the order behind tokens not yet sent
            else:
                self._raw_emit(batch)

        super().start(counted, on_exit, on_serving)

    def share_stage(self, op_id: str, source: str, model_id: str, version: str, expected: str):
        """Rank 0: have every other rank stage the same source path on its own host (its
        agent runs the staging, digest-checked, as if told directly)."""
        self._send(("stage", [op_id, source, model_id, version, expected]))

    def staged_on(self, rank: int, op_id: str) -> Optional[tuple[str, str]]:
        """Rank 0: how stage `op_id` went on follower `rank` ("running", "done" or "failed",
        and its message), as its last heartbeat said; None if it has not started it."""
        hb = self._heartbeat
        stages = hb.info(rank).get("stages") if hb is not None else None
        got = stages.get(op_id) if isinstance(stages, dict) else None
        if isinstance(got, list) and len(got) == 2 and all(isinstance(x, str) for x in got):
            return got[0], got[1]
        return None

    @property
    def failure(self) -> str:
        """Why the group failed; empty while it has not."""
        return self._failed

    def submit(self, request: EngineRequest) -> None:
        if self.follower:
            raise EngineClosed(
                f"rank {self.group_spec.rank} of a node group serves no requests; send them to "
                f"rank 0 ({self.group_spec.addresses[0]})"
            )
        super().submit(request)

    def group_status(self) -> node_pb2.NodeGroup:
        spec, hb = self.group_spec, self._heartbeat
        ranks = []
        for r in range(spec.size):
            rank = node_pb2.GroupRank(rank=r, address=spec.addresses[r])
            if r == spec.rank:
                mem = host_memory()
                info = {
                    "host": socket.gethostname(),
                    "total": mem.total_bytes,
                    "avail": mem.available_bytes,
                    "rss": mem.process_rss_bytes,
                }
                rank.health = "ok" if self._group is not None else "joining"
            elif hb is None or self._group is None:
                info, rank.health = {}, "ok" if self._heard(r) else "joining"
            elif r in hb.watched():
                info, rank.last_heard_s = hb.info(r), hb.age(r)
                rank.health = "silent" if rank.last_heard_s > 2 * hb.period_s else "ok"
            else:
                info = {}  # a follower watches rank 0 only
            if self._failed and r == self._failed_rank:
                rank.health = "failed"
            rank.hostname = str(info.get("host", ""))
            rank.memory_total_bytes = int(info.get("total", 0))
            rank.memory_available_bytes = int(info.get("avail", 0))
            rank.process_rss_bytes = int(info.get("rss", 0))
            ranks.append(rank)
        return node_pb2.NodeGroup(
            size=spec.size,
            rank=spec.rank,
            mode=spec.mode,
            backend=spec.backend,
            ranks=ranks,
            model_digest=self.model_digest,
        )

    # -- engine thread: the shared loop --------------------------------------------

    def _take(self, block: bool) -> list:
        if self._group is None:
            self._join()
        if self.follower:
            closing = False
            for kind, arg in super()._take(block=False):
                if kind == "load":
                    self._park(arg)
                elif kind == "close":
                    closing = True
            if closing:  # leaving fails the group on the other ranks: that is what it means
                return [("close", None)]
            items = self._decode(self._share(None))
            if any(kind == "close" for kind, _ in items):
                self._fail_group(0, "shut down, which ends the group")
            return items
        items = self._encode(super()._take(block and not self._pending))
        try:
            self._share([wire for wire, _ in items] or None)
        except GroupFailed:
            self._fail_taken([item for _, item in items])
            raise
        return [item for _, item in items]

    def _fail_taken(self, items: list) -> None:
        """Commands taken from the inbox when the group failed: answer them too."""
        failed = EngineEvent(EventKind.FAILED, message=self._failed)
        for kind, arg in items:
            if kind == "submit":
                self._raw_emit([(arg.key, [failed])])
            elif kind == "load" and not arg.done():
                arg.set_exception(GroupFailed(self._failed))

    def _encode(self, items: list) -> list[tuple[list, tuple]]:
        """Rank 0's commands as (wire form for the followers, the command itself)."""
        out = []
        for kind, arg in items:
            if kind == "submit":
                wire = [
                    "submit",
                    arg.key,
                    list(arg.prompt_tokens),
                    arg.prefix_len,
                    arg.max_tokens,
                    dataclasses.asdict(arg.sampling),
                    arg.schema if arg.matcher is not None else "",  # each rank masks alike
                ]
            elif kind == "cancel":
                wire = ["cancel", arg]
            elif kind == "stage":
                wire = ["stage", *arg]
            elif kind == "load":
                wire = ["load", str(self._path), self._model_id]
            else:
                wire = [kind]
            out.append((wire, (kind, arg)))
        return out

    def _decode(self, wire: Optional[list]) -> list:
        items = []
        for item in wire or ():
            kind = item[0]
            if kind == "submit":
                _, key, tokens, prefix_len, max_tokens, sampling, schema = item
                matcher = self._matcher(schema, tokens[len(tokens) - prefix_len :])
                request = EngineRequest(
                    key=key,
                    prompt_tokens=tokens,
                    prefix_len=prefix_len,
                    max_tokens=max_tokens,
                    sampling=Sampling(**sampling),
                    matcher=matcher,
                )
                items.append(("submit", request))
            elif kind == "cancel":
                items.append(("cancel", item[1]))
            elif kind == "stage":  # staged by this rank's agent, off the engine thread
                if self.on_stage is not None:
                    self.on_stage(*item[1:6])
            elif kind == "load":
                items.append(("load", (item[1], item[2])))
            else:
                items.append((kind, None))
        return items

    def _matcher(self, schema: str, prefix: list[int]):
        """A follower's grammar matcher for a constrained request, as rank 0 built its own."""
        if not schema:
            return None
        from cluster.quality.notes import OutputSpec
        from node_agent.grammar import Grammars

        if self._grammars is None:
            eos = frozenset(self._tokenizer.eos_token_ids)
            self._grammars = Grammars(self._tokenizer, vocab_size=self._vocab, eos_token_ids=eos)
        return self._grammars.matcher(OutputSpec("", {}, schema), prefix)

    def _step(self) -> None:
        """A model step; its events wait for the next turn's parity check (in `_share`)."""
        self._busy("a model step")
        self._held = []
        try:
            super()._step()
        finally:
            held, self._held = self._held, None
            self._busy_since = 0.0
        self._pending.extend(held)

    def _step_failed(self, exc: Exception) -> None:
        self._collective_failed(exc)

    # -- engine thread: loading ----------------------------------------------------

    def _load(self, arg) -> None:
        if isinstance(arg, Future):  # rank 0: the agent's own load()
            super()._load(arg)
            return
        path, model_id = arg
        before = self._path
        self._path, self._model_id = self._resolve(path), model_id
        try:
            self._loaded = self._do_load()
        except GroupFailed:
            raise
        except NotOnEveryRank as exc:  # nothing switched: rank 0 reports it, the group goes on
            log.warning("node group: load not taken: %s", exc)
            self._path = before
            if self._loaded is None:  # the first load: this rank's agent waits for its answer
                parked, self._parked = self._parked, []
                for fut in parked:
                    if not fut.done():
                        fut.set_exception(exc)
            return
        except BaseException as exc:  # noqa: BLE001 - the group cannot go on without this rank
            self._loaded = exc
            self._fail_group(self.group_spec.rank, f"could not load its shard ({exc})")
            raise GroupFailed(self._failed) from exc
        parked, self._parked = self._parked, []
        for fut in parked:
            if not fut.done():
                fut.set_result(self._loaded)

    def _resolve(self, path: str) -> Path:
        """A follower's own copy of the model rank 0 loads from `path`: the one it loaded
        for that path before (going back), its own staged copy (a staged model's directory
        is named by its digest), the path its agent asked for at start, else `path` itself."""
        if path in self._paths:
            return self._paths[path]
        name = Path(path).name
        if self._staging is not None and DIGEST_FORMAT.fullmatch(f"sha256:{name}"):
            mine = self._staging / name  # staged here too, or missing: never rank 0's files
        elif self._loaded is None:
            mine = self._path  # the first load: this agent's --model or activated model
        else:
            mine = Path(path)
        self._paths[path] = mine
        return mine

    def _park(self, fut: Future) -> None:
        if self._loaded is None:
            self._parked.append(fut)
        elif isinstance(self._loaded, BaseException):
            fut.set_exception(self._loaded)
        else:
            fut.set_result(self._loaded)

    def _load_model(self):
        import mlx.core as mx
        from mlx_lm.generate import generation_stream
        from mlx_lm.utils import sharded_load

        mx.synchronize(generation_stream)  # nothing of the last generation may still be in flight
        key = "tensor_group" if self.group_spec.mode == "tensor" else "pipeline_group"
        return sharded_load(str(self._path), **{key: self._group})

    def _shard_problem(self) -> Optional[str]:
        """Why this rank cannot load its shard of self._path, as one line; None if it can."""
        spec, path = self.group_spec, self._path
        if not (path / "config.json").is_file():
            return (
                f"{spec.describe(spec.rank)} has no copy of {path.name}: stage the model on "
                "every rank of the group, then activate it"
            )
        if spec.mode == "pipeline" and not (path / "model.safetensors.index.json").is_file():
            return (
                f"{path} has no model.safetensors.index.json, which --group-mode pipeline needs "
                "to pick each rank's layers; use tensor mode or add the index"
            )
        if spec.mode == "tensor":
            try:
                config = json.loads((path / "config.json").read_text())
            except (OSError, ValueError) as exc:
                return f"{path}/config.json cannot be read ({type(exc).__name__})"
            for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
                value = int(config.get(name) or 0)
                if value % spec.size:
                    return (
                        f"{name} {value} of {path.name} does not divide among {spec.size} "
                        "ranks: tensor mode needs it to; use --group-mode pipeline"
                    )
            # A quantized layer split along its input (o_proj, down_proj) must split into
            # whole quantization groups: Qwen2.5-72B's 29,568-wide MLP in groups of 64 does
            # not split four ways, and the load would fail inside the split.
            group_size = int((config.get("quantization") or {}).get("group_size") or 0)
            for name in ("hidden_size", "intermediate_size"):
                value = int(config.get(name) or 0)
                if group_size and (value // spec.size) % group_size:
                    return (
                        f"{name} {value} of {path.name} in quantization groups of {group_size} "
                        f"does not split into whole groups among {spec.size} ranks: tensor mode "
                        "needs it to; use a checkpoint quantized with a smaller group size, "
                        "fewer ranks, or --group-mode pipeline"
                    )
        return None

    def _do_load(self):
        # All ranks switch or none: each says whether it can before any rank loads.
        problem = self._shard_problem()
        have = (self._path / "config.json").is_file()
        codes = self._ranks_say(0 if problem is None else 1 if not have else 2)
        if problem is not None:
            raise NotOnEveryRank(problem)
        for rank, code in enumerate(codes):
            if code:
                why = (
                    "has no copy of it: stage the model on every rank of the group, then "
                    "activate it"
                    if code == 1
                    else "cannot shard it (its log says why)"
                )
                raise NotOnEveryRank(
                    f"{self.group_spec.describe(rank)} {why}; nothing switched ({self._path.name})"
                )
        facts = super()._do_load()
        self._grammars = None  # built again for the new tokenizer when first needed
        # Every rank must hold the same model: each computes its own embedding and head.
        self._check_same(
            hashlib.blake2b(facts.weights_digest.encode(), digest_size=8).digest(),
            f"loaded other weights than rank 0 (its digest {facts.weights_digest[:19]})",
        )
        # Silence counts from the first load on: loading (imports, reading weights, the
        # load's own barrier) can keep a rank from answering for a while on a busy host.
        self._heartbeat.arm()
        return facts

    def _model_digest(self) -> str:
        self.model_digest = super()._model_digest()
        return layout_digest(self.model_digest, self.group_spec)

    def _new_prompt_cache(self):
        """Kept prompts are evicted by count only: each rank holds a different shard's bytes,
        and a byte limit could evict differently on different ranks (different prefills)."""
        from mlx_lm.models.cache import LRUPromptCache

        if self._cache_entries <= 0:
            return None
        return LRUPromptCache(max_size=self._cache_entries, max_bytes=1 << 62)

    # -- engine thread: collectives ------------------------------------------------

    def _join(self) -> None:
        spec = self.group_spec
        log.info(
            "node group: rank %d of %d waiting for every rank to join (%s, %s)",
            spec.rank,
            spec.size,
            spec.backend,
            spec.mode,
        )
        import mlx_lm.generate  # noqa: F401 - seconds of imports, done before the group waits
        import mlx_lm.utils  # noqa: F401

        self._heartbeat = Heartbeat(
            spec,
            on_silent=self._fail_group,
            tick=self._watch,
            stages=lambda: self.stage_report(),
        )
        self._heartbeat.start()
        waited = 0
        while not self._heartbeat.rendezvous(1.0):
            if self._inbox_closing():
                raise GroupFailed(f"rank {spec.rank} stopped before the group formed")
            waited += 1
            if waited in (2, 30) or waited % 300 == 0:  # said again now and then, not each second
                missing = [r for r in range(spec.size) if r != spec.rank and not self._heard(r)]
                self._progress(
                    f"node group: rank {spec.rank} waiting {waited}s for "
                    + (", ".join(spec.describe(r) for r in missing) or "every rank")
                    + " to join; start their agents with the same --group"
                )
        self._group = form(spec)
        log.info("node group formed: rank %d of %d", spec.rank, spec.size)
        self._progress(f"node group formed ({spec.size} ranks); loading this rank's shard")

    def _heard(self, rank: int) -> bool:
        return self._heartbeat is not None and rank in self._heartbeat.heard

    @staticmethod
    def _progress(why: str) -> None:
        log.info("%s", why)  # GetStatus shows the same: ranks not yet heard are "joining"

    def _inbox_closing(self) -> bool:
        """A close sent while the group forms (other commands wait in the inbox)."""
        items = MlxEngine._take(self, block=False)
        for item in items:
            self._inbox.put(item)
        return any(kind == "close" for kind, _ in items)

    def _all_sum(self, x):
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        self._busy("a collective")
        try:
            y = mx.distributed.all_sum(x, group=self._group, stream=generation_stream)
            mx.eval(y)
            return y
        except RuntimeError as exc:
            self._collective_failed(exc)
        finally:
            self._busy_since = 0.0

    def _share(self, wire: Optional[list]) -> Optional[list]:
        """Rank 0's `wire` on every rank (None when rank 0 had nothing); JSON, never pickle.
        The same collective compares the ranks' parity hashes (token parity) and then sends
        the events held back until they agreed: one small collective per turn."""
        import mlx.core as mx
        import numpy as np

        data = json.dumps(wire).encode() if wire is not None and not self.follower else b""
        got = self._all_sum(mx.array([len(data), *self._parity_vector()], dtype=mx.int32))
        got = got.tolist()
        self._compare(got[1:], _PARITY_DIFFERS)
        pending, self._pending = self._pending, []
        if pending:
            self._raw_emit(pending)
        n = int(got[0])
        if n == 0:
            return None
        buf = mx.array(np.frombuffer(data, dtype=np.uint8)) if data else mx.zeros((n,), mx.uint8)
        return json.loads(bytes(np.array(self._all_sum(buf), dtype=np.uint8)))

    def _ranks_say(self, code: int) -> list[int]:
        """Every rank's small answer, in rank order (every rank asks at the same point)."""
        import mlx.core as mx

        vec = [0] * self.group_spec.size
        vec[self.group_spec.rank] = code
        return [int(c) for c in self._all_sum(mx.array(vec, dtype=mx.int32)).tolist()]

    def _check_same(self, digest: bytes, differs: str) -> None:
        """Every rank's `digest` (8 bytes) compared with rank 0's; the first that differs
        fails the group with `differs` as the cause."""
        import mlx.core as mx

        got = self._all_sum(mx.array(self._parity_vector(digest), dtype=mx.int32)).tolist()
        self._compare(got, differs)

    def _parity_vector(self, digest: Optional[bytes] = None) -> list[int]:
        """This rank's 8-byte `digest` (default: the parity hash) in its slot, zeros elsewhere."""
        spec = self.group_spec
        mine = int.from_bytes((digest or self._parity.digest())[:8], "little") >> 1
        parts = [(mine >> (21 * i)) & ((1 << 21) - 1) for i in range(_HASH_PARTS)]
        vec = [0] * (_HASH_PARTS * spec.size)
        vec[_HASH_PARTS * spec.rank : _HASH_PARTS * (spec.rank + 1)] = parts
        return vec

    def _compare(self, got: list[int], differs: str) -> None:
        """Every rank's slot against rank 0's; the first that differs fails the group."""
        size = self.group_spec.size
        hashes = [tuple(got[_HASH_PARTS * r : _HASH_PARTS * (r + 1)]) for r in range(size)]
        differ = [r for r in range(size) if hashes[r] != hashes[0]]
        if differ:
            self._fail_group(differ[0], differs)
            raise GroupFailed(self._failed)

    def _busy(self, what: str) -> None:
        self._busy_what = what
        self._busy_since = time.monotonic()

    def _collective_failed(self, exc: Exception) -> None:
        """A step or collective raised (e.g. a peer closed its link): name the peer whose
        heartbeat stopped, if one did."""
        hb = self._heartbeat
        rank = None
        if hb is not None:
            deadline = time.monotonic() + min(self.group_spec.timeout_s, 5 * hb.period_s)
            while True:
                stale = hb.stale(2 * hb.period_s)
                if stale or time.monotonic() > deadline:
                    break
                time.sleep(hb.period_s / 2)
            rank = stale[0] if stale else None
        cause = "went silent" if rank is not None else "failed"
        self._fail_group(rank, f"{cause}: a step or collective raised ({exc})")
        raise GroupFailed(self._failed) from exc

    def _watch(self) -> None:
        """Heartbeat thread, every period: a step or collective stuck past the deadline."""
        since = self._busy_since
        if not since or self._failed:
            return
        waited = time.monotonic() - since
        # Before the first load a rank may wait long for a peer still loading its weights.
        deadline = self.group_spec.timeout_s * (1 if self._heartbeat.armed else LOAD_FACTOR)
        if waited > deadline:
            hb = self._heartbeat
            stale = hb.stale(2 * hb.period_s) if hb is not None else []
            self._fail_group(
                stale[0] if stale else None,
                f"left {self._busy_what} waiting {waited:.1f}s (deadline {deadline:g}s)",
            )

    # -- any thread: failing -----------------------------------------------------------

    def _fail_group(self, rank: Optional[int], cause: str) -> None:
        """Once: name the rank and cause, end every request, tell the agent, exit soon."""
        spec = self.group_spec
        with self._fail_lock:
            if self._failed:
                return
            who = spec.describe(rank) if rank is not None else "a peer of this rank"
            self._failed_rank = rank
            self._failed = (
                f"node group failed: {who} {cause}; rank {spec.rank} exits (code "
                f"{GROUP_FAILED_EXIT_CODE}) for its service manager to restart it, and the "
                "group forms again when every rank is back"
            )
        log.error("%s", self._failed)
        with self._gate:
            self._closed.set()
        keys = self._keys_in_flight()
        if keys and self._raw_emit is not None:
            event = EngineEvent(EventKind.FAILED, message=self._failed)
            self._raw_emit([(k, [event]) for k in keys])
        parked, self._parked = self._parked, []
        for fut in parked:
            if not fut.done():
                fut.set_exception(GroupFailed(self._failed))
        if self._on_exit is not None:
            self._on_exit(self._failed)
        timer = threading.Timer(EXIT_AFTER_S, os._exit, (GROUP_FAILED_EXIT_CODE,))
        timer.daemon = True
        timer.start()

    def _keys_in_flight(self) -> list[str]:
        """Admitted, waiting and not yet taken requests; read from another thread, so retried."""
        keys: list[str] = []
        for _ in range(5):
            try:
                keys = list(self._uid_of) + [r.key for r in list(self._waiting)]
                break
            except RuntimeError:  # changed while read
                continue
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return keys
            if kind == "submit":
                keys.append(arg.key)
            elif kind == "load" and not arg.done():
                arg.set_exception(GroupFailed(self._failed))
