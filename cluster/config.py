"""Configuration: one frozen object per role, from flags + environment + config file.

Flags (init keyword arguments) win over `STUDIOFLEET_NODE_*` / `STUDIOFLEET_COORDINATOR_*`
environment variables, which win over the role's table in the TOML file named by
`config_file` (see cluster/config_file.py), which wins over defaults. Units are in the
field names. Loaded once at start and passed down explicitly.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from cluster.config_file import TableSource


def split_host_port(address: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); raises ValueError with the bad value."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (port 0-65535), got {address!r}")
    return host.strip("[]"), int(port)


def _host_port(value: str) -> str:
    split_host_port(value)
    return value


def _http_listen(value: str) -> str:
    if value not in ("", "off"):
        split_host_port(value)
    return value


def http_address(listen: str, http_listen: str, offset: int = 1) -> Optional[str]:
    """Where an HTTP(S) port listens: `http_listen`, or by default the gRPC host with port +
    `offset` (monitoring 1: 7700 -> 7701, 7800 -> 7801; the OpenAI front door 2: 7802; port
    0 stays 0); None when "off"."""
    if http_listen == "off":
        return None
    if http_listen:
        return http_listen
    host, port = split_host_port(listen)
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + offset if port else 0}"


HostPort = Annotated[str, AfterValidator(_host_port)]
HttpListen = Annotated[str, AfterValidator(_http_listen)]


def setting(
    default: Any = ...,
    help: str = "",
    *,
    flag: Optional[str] = None,
    metavar: Optional[str] = None,
    default_text: Optional[str] = None,
    cli: bool = True,
    cli_type: Any = None,
    flag_only: bool = False,
    **constraints: Any,
) -> Any:
    """A settings field with everything its flag needs (cluster/settings_cli.py): the help
    text, and where the flag differs from the setting's name, its spelling and wording."""
    extra: dict[str, Any] = {}
    for key, value in (
        ("flag", flag),
        ("metavar", metavar),
        ("default_text", default_text),
        ("cli_type", cli_type),
    ):
        if value is not None:
            extra[key] = value
    if not cli:
        extra["cli"] = False
    if flag_only:
        extra["flag_only"] = True
    return Field(default, description=help, json_schema_extra=extra or None, **constraints)


class FileSettings(BaseSettings):
    """Settings that may also come from the `config_table` table of a TOML file."""

    config_table: ClassVar[str]
    config_file: Optional[Path] = None  # the TOML file (--config / STUDIOFLEET_CONFIG)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        **_: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TableSource(settings_cls, cls.config_table)

    def section(self, kind: type[S]) -> S:
        """The settings of one section (a component gets only its own), as a frozen copy."""
        return kind.model_validate({name: getattr(self, name) for name in kind.model_fields})


S = TypeVar("S", bound=BaseModel)
_SECTION = ConfigDict(frozen=True, extra="forbid")


class HttpPortSection(BaseModel):
    """The limits of a daemon's HTTP(S) ports (cluster/http_guard.py; docs/security.md)."""

    model_config = _SECTION

    http_handshake_timeout_s: float = setting(
        10.0, "HTTP ports: seconds a TLS handshake may take.", gt=0
    )
    http_header_timeout_s: float = setting(
        10.0,
        "HTTP ports: seconds a request header may take from its first "
        "byte (a new connection's from its handshake).",
        gt=0,
    )
    http_idle_timeout_s: float = setting(
        30.0, "HTTP ports: seconds a kept-alive connection may wait for its next request.", gt=0
    )
    http_body_timeout_s: float = setting(60.0, "HTTP ports: seconds a request body may take.", gt=0)
    http_max_connections: int = setting(
        256,
        "HTTP ports: open connections per port (and at most a quarter of the file limit).",
        ge=1,
    )
    http_max_unauthenticated: int = setting(
        128,
        "HTTP ports: connections per port that have not yet proved a caller (one address: half).",
        ge=1,
    )
    # Refusals per client address and window: the first `burst` are audited one by one, the
    # rest as one record per window with their count; past `unauthenticated_per_window`
    # attempts without a valid credential the address gets 429 until its window ends.
    http_denial_window_s: float = setting(
        60.0, "HTTP ports: window of the per-address refusal counts.", gt=0
    )
    http_denial_burst: int = setting(
        5,
        "HTTP ports: refusals per address and window audited one by one; the "
        "rest as one record with a count.",
        ge=0,
    )
    http_unauthenticated_per_window: int = setting(
        30,
        "HTTP ports: attempts without a valid credential per address and window before 429.",
        ge=1,
    )


_TLS_DIR = "Directory with ca.pem, crl.pem and NAME.pem/NAME.key (also STUDIOFLEET_TLS_DIR)."
_PLAINTEXT = "No TLS, no roles: loopback development only."
_LISTEN = "HOST:PORT to serve on; port 0 picks a free one."
_FLEET = r"^[A-Za-z0-9_.-]{1,32}$"
# A traffic class name (cluster/traffic.py); empty: the default by engine.
NODE_CLASS_PATTERN = r"^([a-z0-9][a-z0-9_-]{0,31})?$"


class NodeSettings(HttpPortSection, FileSettings):
    """Everything `fleet-node` needs to serve one model."""

    model_config = SettingsConfigDict(env_prefix="STUDIOFLEET_NODE_", frozen=True, extra="forbid")
    config_table = "node"

    model_path: Path = setting(
        ...,
        "Local model directory (config.json, *.safetensors, tokenizer): MLX for "
        "--engine mlx, Hugging Face for vllm; or model_path in the config file.",
        flag="--model",
    )
    listen: HostPort = setting("127.0.0.1:7700", _LISTEN, metavar="HOST:PORT")
    node_id: Optional[str] = setting(
        None, "Unique node id.", default_text="derived from host and port"
    )
    model_id: Optional[str] = setting(None, "Model name to report.", default_text="directory name")
    model_version: str = setting("", "Version label to report.")
    engine: str = setting(
        "mlx",
        "Engine plug-in: mlx (mlx-lm in-process), vllm (a supervised vLLM "
        "server) or upstream (a remote endpoint).",
    )
    node_class: str = setting(
        "",
        "Traffic class the coordinator's traffic policy sees this node in (docs/traffic.md): "
        "lower-case letters, digits, '-' or '_', e.g. macs.",
        metavar="NAME",
        default_text="upstream for --engine upstream, else local",
        pattern=NODE_CLASS_PATTERN,
    )
    max_running: int = setting(32, "Sequences decoded together.", ge=1, le=1024)
    max_queued: int = setting(
        64, "Requests waiting for a slot before RESOURCE_EXHAUSTED.", ge=0, le=100_000
    )
    max_tokens_limit: int = setting(4096, "Largest max_tokens accepted.", ge=1)
    max_context_tokens: Optional[int] = setting(None, "Cap the model's context length.", ge=16)
    prefill_batch_size: int = setting(8, "Prompts prefilled together in one step.", ge=1)
    # Smaller keeps running decodes flowing (inter-token latency), larger gives faster first tokens.
    prefill_step_size: int = setting(512, "Prompt tokens prefilled per step.", ge=16)
    # Reused prompt prefixes (KV caches) hold PHI-derived state: never written to disk,
    # dropped with the model.
    prompt_cache_entries: int = setting(16, "Prompt prefixes kept for reuse (0 = off).", ge=0)
    prompt_cache_bytes: int = setting(
        4 << 30, "Bytes the kept prompt prefixes may hold in memory.", ge=0
    )
    max_stop_sequences: int = setting(8, "Stop sequences a request may give.", ge=0)
    warmup_tokens: int = setting(
        4, "Tokens the warm-up canary generates before the node is READY.", ge=1
    )
    shutdown_grace_s: float = setting(30.0, "Seconds in-flight requests get on SIGTERM.", ge=0)
    retry_after_ms: int = setting(500, "Retry hint sent with RESOURCE_EXHAUSTED.", ge=0)
    # Operations (docs/operations.md): cordon/drain state, the active model and the staging
    # area live here, so they survive an agent restart. One directory per node.
    state_dir: Path = setting(
        Path("studiofleet-node"), "Cordon/drain state, active model and staged weights."
    )
    drain_timeout_s: float = setting(120.0, "Drain deadline when a drain names none.", gt=0)
    max_staged_gb: float = setting(
        500.0, "Staged and incoming weights together may use this many GB.", gt=0
    )
    staging_reserve_gb: float = setting(5.0, "GB of disk a staging must leave free.", ge=0)
    # The vLLM engine (docs/node.md): the agent runs `VLLM_PYTHON -m
    # vllm.entrypoints.openai.api_server` on loopback with the model, --max-model-len and
    # --max-num-seqs set from the settings above, plus `vllm_args`.
    vllm_python: str = setting(
        "", "vllm engine: the Python of a virtualenv with vLLM.", default_text="this one"
    )
    vllm_args: Annotated[tuple[str, ...], NoDecode] = setting(
        (),
        "vllm engine: extra server arguments, shell-quoted, e.g. '--dtype bfloat16 "
        "--gpu-memory-utilization 0.9' (a list in the config file).",
        cli_type=str,
    )
    vllm_port: int = setting(
        0,
        "vllm engine: loopback port of the vLLM server.",
        default_text="a free one",
        ge=0,
        le=65535,
    )
    vllm_startup_timeout_s: float = setting(
        600.0, "vllm engine: seconds the server gets to answer /health.", gt=0
    )
    vllm_restart_max_backoff_s: float = setting(
        60.0, "vllm engine: longest wait between restarts of a server that keeps failing.", ge=0
    )
    # The upstream engine (docs/upstream.md): a remote OpenAI-compatible endpoint as a node;
    # --model still names a local directory with config.json and the tokenizer.
    upstream_url: str = setting(
        "",
        "upstream engine: base URL of the remote endpoint (http[s]://host:port; "
        "no credentials: the key goes in --upstream-key-file).",
        pattern=r"^(https?://[^\s/?#@]+(/[^\s?#@]*)?)?$",
    )
    upstream_model: str = setting(
        "",
        "upstream engine: the model name the endpoint serves.",
        pattern=r"^[\x21-\x7e]{0,120}$",  # printable, no spaces: it is in the openai kind's digest
    )
    upstream_key_file: Optional[Path] = setting(
        None, "upstream engine: file holding the endpoint's bearer key."
    )
    upstream_kind: str = setting(
        "vllm",
        "upstream engine: vllm (token ids in and out; exact resume) or openai (a hosted "
        "API: chat messages in, text out; never resumed exactly).",
        pattern="^(vllm|openai)$",
    )
    upstream_digest: str = setting(
        "",
        "upstream engine, vllm kind: the served model's weights digest (sha256:...).",
        default_text="the --model directory's",
        pattern=r"^(sha256:[0-9a-f]{64})?$",
    )
    upstream_weights_check: str = setting(
        "auto",
        "upstream engine, vllm kind: auto runs the weights in --model here, where they are "
        "the digest's and fit in a quarter of the free memory, and requires the endpoint's "
        "greedy tokens to equal theirs; off takes the endpoint's weights on trust.",
        pattern="^(auto|off)$",
    )
    upstream_ca_file: Optional[Path] = setting(
        None, "upstream engine: CA bundle for an https endpoint.", default_text="the system's"
    )
    upstream_max_backoff_s: float = setting(
        30.0, "upstream engine: longest wait between tries to reach the endpoint at start.", gt=0
    )
    phi_allowed: bool = setting(
        False,
        "upstream engine: declare the endpoint covered for PHI (e.g. a BAA).",
        flag_only=True,
        default_text="",
    )
    # Node groups (docs/node-groups.md): one model sharded over several agents with
    # mlx.distributed; rank 0 serves requests, the other ranks follow its steps.
    group: Annotated[tuple[str, ...], NoDecode] = setting(
        (),
        "Node group: every rank's address for the collective backend, in rank order "
        "(HOST:PORT,HOST:PORT,...); the same list on every rank.",
        metavar="HOST:PORT,...",
        cli_type=str,
        default_text="no group",
    )
    rank: int = setting(0, "Node group: this agent's place in --group (rank 0 serves).", ge=0)
    group_backend: str = setting(
        "ring",
        "Node group: mlx.distributed backend: ring (TCP), jaccl (RDMA over Thunderbolt 5) or mpi.",
        pattern="^(ring|jaccl|mpi)$",
    )
    group_mode: str = setting(
        "tensor",
        "Node group: tensor (each layer split across ranks) or pipeline (layers divided).",
        pattern="^(tensor|pipeline)$",
    )
    group_timeout_s: float = setting(
        10.0,
        "Node group: a rank silent this long (no heartbeat, or a step stuck in a "
        "collective) fails the group; above the longest step (a prefill chunk).",
        ge=2.0,
    )
    mdns: bool = setting(True, "Announce over mDNS for zero-config discovery.")
    fleet: str = setting(
        "default",
        "Fleet name announced over mDNS; coordinators take only their own.",
        pattern=_FLEET,
    )
    tls_dir: Optional[Path] = setting(None, _TLS_DIR)
    tls_name: Optional[str] = setting(
        None, "Certificate name; it must equal the node id.", default_text="the node id"
    )
    plaintext: bool = setting(False, _PLAINTEXT, flag_only=True, default_text="")
    # Monitoring (docs/monitoring.md): /metrics on an HTTP(S) port of its own, with the
    # same certificates and roles as gRPC.
    http_listen: HttpListen = setting(
        "",
        "HOST:PORT of the monitoring port (/metrics), or off.",
        metavar="HOST:PORT",
        default_text="the --listen host, port + 1",
    )
    metrics: bool = setting(True, "Prometheus metrics on the monitoring port.")
    log_format: str = setting(
        "json", "json (one JSON object per line) or text.", pattern="^(json|text)$"
    )
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING.")

    @field_validator("vllm_args", mode="before")
    @classmethod
    def _split_args(cls, v):
        return tuple(shlex.split(v)) if isinstance(v, str) else v

    @field_validator("group", mode="before")
    @classmethod
    def _split_group(cls, v):
        if isinstance(v, str):
            v = tuple(a.strip() for a in v.split(",") if a.strip())
        return v

    @field_validator("group")
    @classmethod
    def _check_group(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for address in v:
            try:
                _, port = split_host_port(address)
            except ValueError as exc:
                raise ValueError(f"--group: {exc}") from None
            if not port:
                raise ValueError(f"--group: {address!r} needs a real port, not 0")
        if len(v) == 1:
            raise ValueError("--group needs two or more ranks' addresses (HOST:PORT,HOST:PORT)")
        if len(set(v)) != len(v):
            raise ValueError("--group lists an address twice; each rank needs its own")
        return v

    @model_validator(mode="after")
    def _check_rank(self):
        if self.group and self.rank >= len(self.group):
            raise ValueError(
                f"--rank {self.rank} is outside --group's {len(self.group)} ranks (0-"
                f"{len(self.group) - 1})"
            )
        if not self.group and self.rank:
            raise ValueError("--rank needs --group (every rank's address, in rank order)")
        if self.group and self.engine != "mlx":
            raise ValueError(f"--group needs --engine mlx (got {self.engine})")
        return self


class HealthSection(BaseModel):
    """How the coordinator judges nodes (coordinator/fleet.py, health_policy.py). Anchors
    (shared/RELIABILITY.md): probe period 10 s, 3 failures; Envoy ejects for 30 s x n after
    5. Tighter here: a clinical stream must not stall for long."""

    model_config = _SECTION

    poll_interval_s: float = setting(1.0, "Status poll per node, +-jitter.", gt=0)
    poll_jitter: float = setting(0.2, "+- fraction of the poll interval.", ge=0, lt=1)
    probe_timeout_s: float = setting(1.0, "Seconds a status probe may take.", gt=0)
    eject_after_failures: int = setting(3, "Consecutive failures that eject a node.", ge=1)
    eject_base_s: float = setting(2.0, "Ejection n lasts base x n seconds.", gt=0)
    eject_max_s: float = setting(60.0, "Longest ejection.", gt=0)
    readmit_after_probes: int = setting(3, "Passing probes before readmission.", ge=1)
    ejection_decay_s: float = setting(300.0, "Healthy this long: the ejection count resets.", gt=0)


class AdmissionSection(BaseModel):
    """Routing, admission and failover of requests (cluster/routing.py, coordinator/admission.py, relay.py)."""

    model_config = _SECTION

    affinity_load_factor: float = setting(
        1.25,
        "Bounded-load consistent hashing: a node takes at most this times the mean load.",
        ge=1.0,
    )
    queue_max_depth: int = setting(
        256, "Requests waiting for a node before RESOURCE_EXHAUSTED.", ge=0
    )
    queue_max_wait_s: float = setting(10.0, "Longest wait for a node.", ge=0)
    retry_after_ms: int = setting(500, "Retry hint sent with RESOURCE_EXHAUSTED.", ge=0)
    max_failovers: int = setting(3, "Node moves per request.", ge=0)
    first_token_timeout_s: float = setting(
        120.0, "A node call with no first token this long moves to another node.", gt=0
    )
    stall_timeout_s: float = setting(
        30.0,
        "A node that sends no next token this long (time spent waiting for "
        "the caller to read excluded) is failed over.",
        gt=0,
    )
    max_tokens_limit: int = setting(4096, "Largest max_tokens accepted.", ge=1)
    max_stop_sequences: int = setting(8, "Stop sequences a request may give.", ge=0)
    max_concurrent_per_caller: int = setting(
        64, "Requests in flight per caller identity (queued included).", ge=1
    )


class AuditSection(BaseModel):
    """The audit chain (docs/security.md): one record per request and admin action, fsynced
    before the final chunk goes out. Off only in plaintext development mode."""

    model_config = _SECTION

    audit: bool = setting(True, "Keep the audit chain (off: plaintext only).")
    audit_dir: Path = setting(Path("studiofleet-audit"), "Audit chain directory.")
    # In production put the keys on another volume or host.
    audit_key_dir: Optional[Path] = setting(
        None, "Audit HMAC and signing keys.", default_text="AUDIT_DIR-keys, beside the log"
    )
    audit_checkpoint_every: int = setting(1000, "Records between signed checkpoints.", ge=1)
    audit_checkpoint_interval_s: float = setting(
        60.0, "Longest time between signed checkpoints.", gt=0
    )
    audit_max_file_mb: int = setting(64, "Size at which the chain starts a new file.", ge=1)
    audit_witness_refuse: bool = setting(
        True,
        "A node holding an audit HEAD for records the chain lacks (a cut "
        "tail) stops the coordinator (exit 3), or only raises the alarm.",
        flag="--audit-witness-refuse/--audit-witness-alert",
        default_text="refuse",
    )


class RolloutSection(BaseModel):
    """Rollouts (docs/operations.md) and their gates: smoke generations always, then the gate
    command and the eval gate if set."""

    model_config = _SECTION

    rollout_lease_s: float = setting(
        15.0, "The rollout lease's term; a holder renews it well before.", gt=0
    )
    rollout_gate_command: Optional[str] = setting(
        None,
        "Quality gate run after a node activates new weights; "
        "exit 0 passes (env NODE_ID, NODE_ADDRESS, WEIGHTS_DIGEST, "
        "ROLLOUT_ID).",
    )
    rollout_gate_timeout_s: float = setting(300.0, "Seconds the gate command may take.", gt=0)
    rollout_smoke_requests: int = setting(
        2, "Smoke generations a node must pass after it activates.", ge=1
    )
    rollout_eval_suite: Optional[str] = setting(
        None,
        "Eval gate: a suite file (TOML, e.g. the starter suite); "
        "a node rejoins only if its score is within "
        "--rollout-eval-margin of the current version's.",
    )
    rollout_eval_margin: float = setting(
        0.05, "How far under the current version's suite score a new version may score.", ge=0, le=1
    )
    rollout_eval_min_score: float = setting(
        0.0, "The eval gate's floor, whatever the current version scores.", ge=0, le=1
    )
    rollout_eval_template: str = setting(
        "", "Prompt template for the eval gate instead of the suite's (e.g. soap-brief)."
    )
    rollout_shadow_gate: bool = setting(
        False,
        "Shadow gate: a node rejoins only if the latest shadow run compared exactly its new "
        "weights with live traffic and passed (docs/shadow.md).",
    )


class MonitoringSection(BaseModel):
    """/metrics and the dashboard on an HTTP(S) port of their own (same certificates and roles
    as gRPC), and the request log (metadata of every request, never content)."""

    model_config = _SECTION

    http_listen: HttpListen = setting(
        "",
        "HOST:PORT of the monitoring port (/metrics, dashboard), or off.",
        metavar="HOST:PORT",
        default_text="the --listen host, port + 1",
    )
    metrics: bool = setting(True, "Prometheus metrics on the monitoring port.")
    request_log: bool = setting(
        True, "Keep every request's metadata in --state-db (fleetctl requests)."
    )
    request_log_retention_days: float = setting(
        30.0, "Request log rows older than this are deleted.", gt=0
    )
    slow_ttft_ms: float = setting(
        2000.0,
        "A request slower than this to its first token is slow (fleetctl "
        "requests --slow; the TTFT alert's target).",
        gt=0,
    )
    slow_latency_ms: float = setting(
        60000.0, "A request taking longer than this in all is slow.", gt=0
    )
    dashboard_idle_timeout_s: float = setting(
        900.0, "Browser sessions idle this long are logged off (HIPAA automatic logoff).", gt=0
    )


class CapacitySection(BaseModel):
    """The live headroom (docs/capacity.md "Live headroom"): the nodes' capacity profiles, the
    SLA the predicted p95 time per note is held to, and the arrival-rate window."""

    model_config = _SECTION

    capacity_profiles: tuple[str, ...] = setting(
        (),
        "A capacity profile (fleetctl profile's file, or a shipped profile's name; repeatable). A routable "
        "node takes the profile measured on it ([node] node_id), else one for the model it serves ([model] id).",
        flag="--capacity-profile",
        metavar="FILE",
    )
    sla_p95_s: float = setting(
        8.0,
        "The p95 time per note (seconds) the live headroom and its alert hold the fleet to.",
        gt=0,
    )
    capacity_window_s: float = setting(
        300.0, "Seconds of arrivals the live headroom's rate is measured over.", gt=0
    )


class TrafficRule(BaseModel):
    """One model's traffic policy in the config file ([coordinator.traffic."MODEL"])."""

    model_config = _SECTION

    weights: dict[str, int]  # node class -> weight
    overflow: str = ""  # the class that takes overflow


class TrafficSection(BaseModel):
    """The traffic policy (docs/traffic.md): per model id (or "*"), weights across node
    classes and overflow to a class while the local ones would miss --sla-p95-s. What the
    file sets is the policy at start; `fleetctl traffic set` changes it while running."""

    model_config = _SECTION

    traffic: dict[str, TrafficRule] = setting(
        {},
        "A model's traffic policy (repeatable): 'MODEL: CLASS=WEIGHT ... [overflow=CLASS]', "
        "MODEL a model id or '*'; in the config file [coordinator.traffic.\"MODEL\"].",
        metavar="'MODEL: CLASS=WEIGHT...'",
        cli_type=list[str],
        default_text="none",
    )

    @field_validator("traffic", mode="before")
    @classmethod
    def _traffic_flags(cls, value):
        """--traffic 'MODEL: macs=90 upstream=10 overflow=upstream' (repeatable)."""
        if not isinstance(value, (list, tuple)):
            return value
        from cluster.traffic import PolicyError, parse_spec

        out = {}
        for text in value:
            try:
                model, weights, overflow = parse_spec(text)
            except PolicyError as exc:
                raise ValueError(f"--traffic {text[:80]!r}: {exc}") from None
            out[model] = {"weights": weights, "overflow": overflow}
        return out

    traffic_overflow_window_s: float = setting(
        30.0, "Seconds of arrivals the overflow controller's rate is measured over.", gt=0
    )
    traffic_overflow_hold_s: float = setting(
        5.0, "Overflow stops after the local classes have been clear this long.", ge=0
    )
    traffic_overflow_queue_wait_s: float = setting(
        1.0,
        "Without a capacity profile for the local nodes: a local request waiting in the "
        "admission queue longer than this starts overflow.",
        gt=0,
    )

    @field_validator("traffic")
    @classmethod
    def _policies(cls, value: dict[str, TrafficRule]) -> dict[str, TrafficRule]:
        from cluster.traffic import Policy, PolicyError

        for model, rule in value.items():
            try:
                Policy.parse(model, rule.weights, rule.overflow)
            except PolicyError as exc:
                raise ValueError(f"traffic policy for {model[:80]!r}: {exc}") from None
        return value


class OpenAISection(BaseModel):
    """The OpenAI-compatible front door (docs/openai-api.md); bearer tokens in --state-db."""

    model_config = _SECTION

    openai_listen: HttpListen = setting(
        "",
        "HOST:PORT of the OpenAI-compatible API (/v1/chat/completions, "
        "/v1/completions, /v1/models), or off.",
        metavar="HOST:PORT",
        default_text="the --listen host, port + 2",
    )
    openai_default_max_tokens: int = setting(
        2048, "Tokens an OpenAI request without max_tokens may generate, within the context.", ge=1
    )
    openai_max_body_kb: int = setting(
        4096, "Largest OpenAI request body; larger ones get 413.", ge=1
    )


class CoordinatorSettings(
    HealthSection,
    AdmissionSection,
    AuditSection,
    RolloutSection,
    MonitoringSection,
    CapacitySection,
    TrafficSection,
    OpenAISection,
    HttpPortSection,
    FileSettings,
):
    """Everything `fleet-coordinator` needs: where to listen, how to find and judge nodes,
    and how to admit and move requests. Flat flags, environment variables and TOML keys;
    each component takes only its section (`settings.section(HealthSection)`)."""

    model_config = SettingsConfigDict(
        env_prefix="STUDIOFLEET_COORDINATOR_", frozen=True, extra="forbid"
    )
    config_table = "coordinator"

    listen: HostPort = setting("127.0.0.1:7800", _LISTEN, metavar="HOST:PORT")
    coordinator_id: str = setting(
        "",
        "Name in logs, events and audit records.",
        default_text="the certificate's name (--tls-name); the host name with --plaintext",
    )
    nodes: tuple[HostPort, ...] = setting(
        (),
        "Static node address HOST:PORT (repeatable), for networks without multicast.",
        flag="--node",
        metavar="HOST:PORT",
    )
    mdns: bool = setting(True, "Discover node agents over mDNS.")
    mdns_interface: str = setting(
        "0.0.0.0", "Address to browse mDNS on (127.0.0.1 for a local fleet).", default_text="all"
    )
    fleet: str = setting("default", "Take only nodes announcing this fleet name.", pattern=_FLEET)
    mdns_announce: bool = setting(
        True,
        "Announce this coordinator (its gRPC address, OpenAI port and fleet name) "
        "over mDNS on --mdns-interface, for clients that discover coordinators "
        "(docs/ha.md). --no-mdns turns multicast off altogether, announcing included.",
    )
    readiness_interval_s: float = setting(
        2.0,
        "Seconds between probes of the state database (SELECT 1) that "
        "decide readiness (docs/ha.md).",
        gt=0,
    )
    readiness_timeout_s: float = setting(
        1.0, "A state database probe slower than this counts as unreachable.", gt=0
    )
    shutdown_grace_s: float = setting(30.0, "Seconds in-flight requests get on SIGTERM.", ge=0)
    tls_dir: Optional[Path] = setting(None, _TLS_DIR)
    tls_name: Optional[str] = setting(
        None, "Certificate name (role coordinator).", default_text="the coordinator id"
    )
    plaintext: bool = setting(False, _PLAINTEXT, flag_only=True, default_text="")
    # Rollout state, the rollout lease, API tokens and the request log: a restarted
    # coordinator resumes; coordinators sharing the file share the lease.
    state_db: Path = setting(
        Path("studiofleet-coordinator.db"),
        "SQLite file for rollout state and the rollout lease, API tokens and the request log.",
    )
    state_url: Optional[SecretStr] = setting(
        None,
        "State database URL (docs/state.md): sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB "
        "(PostgreSQL 15+; coordinators sharing it share tokens, the request log and the rollout lease).",
        metavar="URL",
        default_text="sqlite:///PATH of --state-db",
    )

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: Optional[SecretStr]) -> Optional[SecretStr]:
        if value is not None:
            from cluster.state_url import parse

            parse(value.get_secret_value())  # ValueError naming the URL without its password
        return value

    log_format: str = setting(
        "json", "json (one JSON object per line) or text.", pattern="^(json|text)$"
    )
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING.")

    @model_validator(mode="after")
    def _default_id(self):
        if not self.coordinator_id:
            import socket

            name = (
                self.tls_name
                or (socket.gethostname().split(".")[0] if self.plaintext else "")
                or "coordinator"
            )
            object.__setattr__(self, "coordinator_id", name)  # frozen: set once, while validating
        return self


class FleetctlSettings(FileSettings):
    """fleetctl's fallbacks from [fleetctl]; its flags and their env vars (read by typer) win."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")
    config_table = "fleetctl"

    coordinator: Optional[HostPort] = None
    tls_dir: Optional[Path] = None
    tls_name: Optional[str] = None
    plaintext: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        **_: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, TableSource(settings_cls, cls.config_table)  # no env: typer reads it
