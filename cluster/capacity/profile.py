"""A node's capacity profile (schema 1, docs/capacity.md "Profile files"): facts about the node
and its model, its limits, and the fitted step-time model the planner runs.

`load_profile(path)` reads and validates a TOML file (errors name the file and the key);
`resolve_profile(spec)` takes a path or the name of a reference profile shipped in
`cluster/capacity/profiles/`; `Profile.to_toml()` / `save(path)` write one back.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from cluster.capacity import toml_write

SCHEMA = 1
MEASURED = "measured"
PUBLISHED = "published, not measured here"
DERIVED_PREFIX = "derived"
ENGINES = ("mlx", "vllm", "upstream")
GROUP_MODES = ("tensor", "pipeline")
GROUP_BACKENDS = ("ring", "jaccl", "mpi")
# What a backend's collectives travel over (docs/node-groups.md), for a profile's [group] link.
GROUP_LINKS = {
    "jaccl": "Thunderbolt 5 RDMA",
    "ring": "TCP (Ethernet or Thunderbolt IP)",
    "mpi": "MPI",
}
PROFILES_PACKAGE = "cluster.capacity"
PROFILES_DIR = "profiles"


class ProfileError(ValueError):
    """A profile that cannot be read or used; the message names the file and the key."""


@dataclass(frozen=True)
class StepModel:
    """The planner's step-time model, in seconds (mirrors mlx-lm's BatchGenerator: one step
    runs the prefill of newly admitted prompts and one decode token for every running sequence)."""

    decode_base_s: float
    decode_per_seq_s: float = 0.0
    decode_per_ctx_token_s: float = 0.0
    prefill_base_s: float = 0.0
    prefill_per_token_s: float = 0.0
    cached_prefix_per_token_s: float = 0.0

    def decode_step_s(self, running: int, context_tokens: float = 0.0) -> float:
        """One decode step with `running` sequences holding `context_tokens` in all (0 if none run)."""
        if running <= 0:
            return 0.0
        return (
            self.decode_base_s
            + self.decode_per_seq_s * (running - 1)
            + self.decode_per_ctx_token_s * context_tokens
        )

    def prefill_s(self, uncached_tokens: float, cached_tokens: float = 0.0) -> float:
        """Prefill of one prompt: `uncached_tokens` computed, `cached_tokens` found in the prompt cache."""
        return (
            self.prefill_base_s
            + self.prefill_per_token_s * uncached_tokens
            + self.cached_prefix_per_token_s * cached_tokens
        )

    def step_s(self, prefills: float, running: int, context_tokens: float = 0.0) -> float:
        """A step whose prefill part takes `prefills` seconds beside the decode of `running` sequences."""
        return prefills + self.decode_step_s(running, context_tokens)

    def stream_decode_tok_s(self) -> float:
        """The per-stream decode rate bound, tokens/s: a sequence alone on the node."""
        return math.inf if self.decode_base_s <= 0 else 1.0 / self.decode_base_s

    def single_note_s(
        self, prompt_tokens: float, output_tokens: float, cached_tokens: float = 0.0
    ) -> float:
        """The lower bound on one note's time: its prefill, then its output alone at the per-stream rate.
        The first output token comes with the prefill step; each further token is one decode step."""
        uncached = max(0.0, prompt_tokens - cached_tokens)
        cached = prompt_tokens - uncached
        return self.prefill_s(uncached, cached) + output_tokens * self.decode_base_s

    def decode_tok_s(self, running: int, context_tokens: float = 0.0) -> float:
        """Aggregate decode tokens/s of the node with `running` sequences (no prefill in the steps)."""
        step = self.decode_step_s(running, context_tokens)
        return 0.0 if step <= 0 else running / step


@dataclass(frozen=True)
class Info:
    name: str
    provenance: str
    created: str = ""
    sources: tuple[str, ...] = ()
    notes: str = ""


@dataclass(frozen=True)
class NodeFacts:
    engine: str
    chip: str
    memory_gb: float
    node_id: str = ""
    group_size: int = 1


@dataclass(frozen=True)
class GroupFacts:
    """A node group ([group] table): `size` machines serve one model as one routing target
    (docs/node-groups.md); the fit is the group's, and costs count every machine."""

    size: int
    mode: str  # tensor | pipeline
    backend: str  # ring | jaccl | mpi
    link: str = ""  # what the collectives travel over
    hosts: tuple[str, ...] = ()  # each rank's host, in rank order (measured profiles)

    def describe(self) -> str:
        return f"{self.size} machines, {self.mode} parallel over {self.backend}" + (
            f" ({self.link})" if self.link else ""
        )


@dataclass(frozen=True)
class ModelFacts:
    id: str
    digest: str = ""
    params_b: float = 0.0
    quantization: str = ""


@dataclass(frozen=True)
class Limits:
    max_running: int
    max_context_tokens: int = 0


@dataclass(frozen=True)
class PrefillPoint:
    prompt_tokens: int
    cached_tokens: int
    seconds: float
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DecodePoint:
    running: int
    context_tokens: int
    step_s: float
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TtftPoint:
    concurrency: int
    p50_s: float
    p95_s: float
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Curves:
    prefill: tuple[PrefillPoint, ...] = ()
    decode: tuple[DecodePoint, ...] = ()
    ttft: tuple[TtftPoint, ...] = ()


@dataclass(frozen=True)
class Memory:
    weights_gb: float = 0.0
    peak_gb: float = 0.0


@dataclass(frozen=True)
class Cost:
    """Optional per-profile cost defaults ([cost] table); flags override them."""

    node_cost_usd: float | None = None  # purchase price of one machine (a group costs size x)
    amortize_months: float | None = None
    power_w: float | None = None  # average draw while serving
    hosting_usd_month: float | None = None  # rack space, network, support per node
    rent_usd_hour: float | None = None  # a rented node instead of a bought one
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    info: Info
    node: NodeFacts
    model: ModelFacts
    limits: Limits
    fit: StepModel
    curves: Curves = Curves()
    memory: Memory = Memory()
    cost: Cost | None = None
    group: GroupFacts | None = None
    path: str | None = field(default=None, compare=False)  # where it was read from

    @property
    def machines(self) -> int:
        """The machines one routing target of this profile takes (a group's size, else 1)."""
        return self.group.size if self.group is not None else self.node.group_size

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def published(self) -> bool:
        return self.info.provenance != MEASURED

    def to_dict(self) -> dict[str, Any]:
        """The TOML document as plain data (schema 1)."""
        doc: dict[str, Any] = {"schema": SCHEMA}
        doc["profile"] = {
            "name": self.info.name,
            "provenance": self.info.provenance,
            "created": self.info.created,
            "sources": list(self.info.sources),
            "notes": self.info.notes,
        }
        doc["node"] = _plain(self.node)
        if self.group is not None:
            doc["group"] = {k: v for k, v in _plain(self.group).items() if v != [] and v != ""}
        doc["model"] = _plain(self.model)
        doc["limits"] = _plain(self.limits)
        doc["fit"] = _plain(self.fit)
        curves = {
            k: [{**_plain(p), **dict(p.extra)} for p in getattr(self.curves, k)]
            for k in ("prefill", "decode", "ttft")
            if getattr(self.curves, k)
        }
        if curves:
            doc["curves"] = curves
        doc["memory"] = _plain(self.memory)
        if self.cost is not None:
            doc["cost"] = {k: v for k, v in _plain(self.cost).items() if v is not None and v != []}
        return doc

    def to_toml(self) -> str:
        return toml_write.dumps(self.to_dict())

    def save(self, path: Path | str) -> Path:
        """Write the profile to `path` (its directory must exist); returns the path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_toml(), encoding="utf-8")
        tmp.replace(path)
        return path


def _plain(obj: Any) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        if f.name == "extra":
            continue
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# ---- reading -------------------------------------------------------------------------


class _Reader:
    """Typed access to one table of the document, with errors that name the file and key."""

    def __init__(self, where: str, table: Mapping[str, Any], prefix: str):
        self.where, self.table, self.prefix = where, table, prefix

    def fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.where}: {self.prefix}{key}: {problem}")

    def get(
        self,
        key: str,
        kind: str,
        default: Any = ...,
        *,
        minimum: float | None = None,
        positive: bool = False,
    ) -> Any:
        if key not in self.table:
            if default is ...:
                raise self.fail(key, "missing (required)")
            return default
        v = self.table[key]
        if kind == "str":
            if not isinstance(v, str):
                raise self.fail(key, f"must be a string, not {_shown(v)}")
            return v
        if kind == "strs":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise self.fail(key, f"must be a list of strings, not {_shown(v)}")
            return tuple(v)
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.fail(key, f"must be an integer, not {_shown(v)}")
        elif kind == "num":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise self.fail(key, f"must be a finite number, not {_shown(v)}")
            v = float(v)
        if positive and v <= 0:
            raise self.fail(key, f"must be > 0, not {v}")
        if minimum is not None and v < minimum:
            raise self.fail(key, f"must be >= {minimum:g}, not {v}")
        return v

    def only(self, known: set[str]) -> None:
        for k in self.table:
            if k not in known:
                raise self.fail(k, f"unknown key (known: {', '.join(sorted(known))})")

    def sub(self, key: str, required: bool = True) -> _Reader:
        if key not in self.table:
            if required:
                raise ProfileError(f"{self.where}: [{self.prefix}{key}]: table missing (required)")
            return _Reader(self.where, {}, f"{self.prefix}{key}.")
        v = self.table[key]
        if not isinstance(v, dict):
            raise ProfileError(
                f"{self.where}: {self.prefix}{key}: must be a table, not {_shown(v)}"
            )
        return _Reader(self.where, v, f"{self.prefix}{key}.")


def _shown(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def parse_profile(doc: Mapping[str, Any], where: str) -> Profile:
    """A Profile from a parsed TOML document; `where` names its source in errors."""
    top = _Reader(where, doc, "")
    schema = top.get("schema", "int")
    if schema != SCHEMA:
        raise top.fail("schema", f"this planner reads schema {SCHEMA}, not {schema}")

    p = top.sub("profile")
    provenance = p.get("provenance", "str")
    if provenance not in (MEASURED, PUBLISHED) and not provenance.startswith(DERIVED_PREFIX):
        raise p.fail(
            "provenance",
            f'must be "{MEASURED}", "{PUBLISHED}" or start "{DERIVED_PREFIX}", not {provenance!r}',
        )
    info = Info(
        name=p.get("name", "str"),
        provenance=provenance,
        created=p.get("created", "str", ""),
        sources=p.get("sources", "strs", ()),
        notes=p.get("notes", "str", ""),
    )
    if not info.name.strip():
        raise p.fail("name", "must not be empty")
    if provenance != MEASURED and not info.sources:
        raise p.fail("sources", "a profile not measured here must cite its sources")

    n = top.sub("node")
    engine = n.get("engine", "str")
    if engine not in ENGINES:
        raise n.fail("engine", f"must be one of {', '.join(ENGINES)}, not {engine!r}")
    node = NodeFacts(
        engine=engine,
        chip=n.get("chip", "str"),
        memory_gb=n.get("memory_gb", "num", minimum=0),
        node_id=n.get("node_id", "str", ""),
        group_size=n.get("group_size", "int", 1, minimum=1),
    )

    group = None
    if "group" in doc:
        g = top.sub("group")
        g.only({x.name for x in fields(GroupFacts)})
        group = GroupFacts(
            size=g.get("size", "int", minimum=2),
            mode=g.get("mode", "str"),
            backend=g.get("backend", "str"),
            link=g.get("link", "str", ""),
            hosts=g.get("hosts", "strs", ()),
        )
        if group.mode not in GROUP_MODES:
            raise g.fail("mode", f"must be one of {', '.join(GROUP_MODES)}, not {group.mode!r}")
        if group.backend not in GROUP_BACKENDS:
            raise g.fail(
                "backend", f"must be one of {', '.join(GROUP_BACKENDS)}, not {group.backend!r}"
            )
        if group.hosts and len(group.hosts) != group.size:
            raise g.fail("hosts", f"lists {len(group.hosts)} hosts for a group of {group.size}")
        if "group_size" not in n.table:
            node = replace(node, group_size=group.size)
        elif node.group_size != group.size:
            raise n.fail(
                "group_size",
                f"is {node.group_size} but [group] size is {group.size}: make them agree",
            )

    m = top.sub("model")
    model = ModelFacts(
        id=m.get("id", "str"),
        digest=m.get("digest", "str", ""),
        params_b=m.get("params_b", "num", 0.0, minimum=0),
        quantization=m.get("quantization", "str", ""),
    )

    lim = top.sub("limits")
    lim.only({"max_running", "max_context_tokens"})
    limits = Limits(
        max_running=lim.get("max_running", "int", minimum=1),
        max_context_tokens=lim.get("max_context_tokens", "int", 0, minimum=0),
    )

    f = top.sub("fit")
    f.only({x.name for x in fields(StepModel)})
    fit = StepModel(
        decode_base_s=f.get("decode_base_s", "num", positive=True),
        decode_per_seq_s=f.get("decode_per_seq_s", "num", 0.0, minimum=0),
        decode_per_ctx_token_s=f.get("decode_per_ctx_token_s", "num", 0.0, minimum=0),
        prefill_base_s=f.get("prefill_base_s", "num", 0.0, minimum=0),
        prefill_per_token_s=f.get("prefill_per_token_s", "num", minimum=0),
        cached_prefix_per_token_s=f.get("cached_prefix_per_token_s", "num", 0.0, minimum=0),
    )

    c = top.sub("curves", required=False)
    curves = Curves(
        prefill=_points(
            c,
            "prefill",
            PrefillPoint,
            (("prompt_tokens", "int"), ("cached_tokens", "int"), ("seconds", "num")),
        ),
        decode=_points(
            c,
            "decode",
            DecodePoint,
            (("running", "int"), ("context_tokens", "int"), ("step_s", "num")),
        ),
        ttft=_points(
            c, "ttft", TtftPoint, (("concurrency", "int"), ("p50_s", "num"), ("p95_s", "num"))
        ),
    )

    mem = top.sub("memory", required=False)
    memory = Memory(
        weights_gb=mem.get("weights_gb", "num", 0.0, minimum=0),
        peak_gb=mem.get("peak_gb", "num", 0.0, minimum=0),
    )

    cost = None
    if "cost" in doc:
        k = top.sub("cost")
        k.only({x.name for x in fields(Cost)})
        cost = Cost(
            **{
                x.name: k.get(x.name, "num", None, minimum=0)
                for x in fields(Cost)
                if x.name != "sources"
            },
            sources=k.get("sources", "strs", ()),
        )
        if cost.amortize_months is not None and cost.amortize_months <= 0:
            raise k.fail("amortize_months", f"must be > 0, not {cost.amortize_months}")
    return Profile(
        info=info,
        node=node,
        model=model,
        limits=limits,
        fit=fit,
        curves=curves,
        memory=memory,
        cost=cost,
        group=group,
        path=where,
    )


def _points(curves: _Reader, key: str, cls, spec) -> tuple:
    raw = curves.table.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise curves.fail(key, f"must be an array of tables ([[curves.{key}]])")
    out = []
    for i, row in enumerate(raw):
        r = _Reader(curves.where, row, f"{curves.prefix}{key}[{i}].")
        vals = {name: r.get(name, kind, minimum=0) for name, kind in spec}
        out.append(cls(**vals, extra={k: v for k, v in row.items() if k not in vals}))
    return tuple(out)


def load_profile(path: Path | str) -> Profile:
    """Read and validate a profile file; ProfileError names the file and the key at fault."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    return parse_profile(doc, str(path))


def reference_profiles() -> dict[str, Path]:
    """The reference profiles shipped with the package: file stem -> path."""
    try:
        folder = resources.files(PROFILES_PACKAGE) / PROFILES_DIR
        if not folder.is_dir():
            return {}
        return {
            Path(p.name).stem: Path(str(p))
            for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".toml")
        }
    except (ModuleNotFoundError, OSError):
        return {}


def resolve_profile(spec: str) -> Profile:
    """A profile by path (anything with a '/' or ending .toml, or an existing file) or by
    the name of a shipped reference profile (its file stem or its [profile] name)."""
    spec = spec.strip()
    if not spec:
        raise ProfileError("empty profile name")
    if "/" in spec or spec.endswith(".toml") or Path(spec).is_file():
        return load_profile(spec)
    shipped = reference_profiles()
    if spec in shipped:
        return load_profile(shipped[spec])
    for path in shipped.values():
        try:
            prof = load_profile(path)
        except ProfileError:
            continue
        if prof.name == spec:
            return prof
    known = ", ".join(shipped) or "none shipped yet"
    raise ProfileError(
        f"{spec}: no such profile file, and no reference profile by that name (reference "
        f"profiles: {known})"
    )
