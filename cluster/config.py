"""Configuration: one frozen object per role, from flags + environment + config file.

Flags (init keyword arguments) win over `STUDIOFLEET_NODE_*` / `STUDIOFLEET_COORDINATOR_*`
environment variables, which win over the role's table in the TOML file named by
`config_file` (see cluster/config_file.py), which wins over defaults. Units are in the
field names. Loaded once at start and passed down explicitly.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, ClassVar, Optional

from pydantic import AfterValidator, Field, field_validator, model_validator
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


class FileSettings(BaseSettings):
    """Settings that may also come from the `config_table` table of a TOML file."""

    config_table: ClassVar[str]
    config_file: Optional[Path] = None    # the TOML file (--config / STUDIOFLEET_CONFIG)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, **_: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TableSource(settings_cls, cls.config_table)


class HttpPortSettings(FileSettings):
    """The limits of a daemon's HTTP(S) ports (cluster/http_guard.py; README "Security")."""

    http_handshake_timeout_s: float = Field(10.0, gt=0)    # the TLS handshake
    http_header_timeout_s: float = Field(10.0, gt=0)       # a whole request header, from its first byte
    http_idle_timeout_s: float = Field(30.0, gt=0)         # a kept-alive connection between requests
    http_body_timeout_s: float = Field(60.0, gt=0)         # a request body (the OpenAI front door)
    http_max_connections: int = Field(256, ge=1)           # per port (and under a quarter of the file limit)
    http_max_unauthenticated: int = Field(128, ge=1)       # per port: connections with no proven caller yet
    # Refusals per client address and window: the first `burst` are audited one by one, the
    # rest as one record per window with their count; past `unauthenticated_per_window`
    # attempts without a valid credential the address gets 429 until its window ends.
    http_denial_window_s: float = Field(60.0, gt=0)
    http_denial_burst: int = Field(5, ge=0)
    http_unauthenticated_per_window: int = Field(30, ge=1)


class NodeSettings(HttpPortSettings):
    """Everything `fleet-node` needs to serve one model."""

    model_config = SettingsConfigDict(env_prefix="STUDIOFLEET_NODE_", frozen=True, extra="forbid")
    config_table = "node"

    model_path: Path
    listen: HostPort = "127.0.0.1:7700"
    node_id: Optional[str] = None
    model_id: Optional[str] = None
    model_version: str = ""
    engine: str = "mlx"
    max_running: int = Field(32, ge=1, le=1024)
    max_queued: int = Field(64, ge=0, le=100_000)
    max_tokens_limit: int = Field(4096, ge=1)
    max_context_tokens: Optional[int] = Field(None, ge=16)
    prefill_batch_size: int = Field(8, ge=1)
    # Each engine step prefills at most this many prompt tokens per batch: smaller keeps
    # running decodes flowing (inter-token latency), larger gives faster first tokens.
    prefill_step_size: int = Field(512, ge=16)
    # Reused prompt prefixes (KV caches) kept in memory; they hold PHI-derived state, are
    # never written to disk and are dropped with the model. 0 entries turns caching off.
    prompt_cache_entries: int = Field(16, ge=0)
    prompt_cache_bytes: int = Field(4 << 30, ge=0)
    max_stop_sequences: int = Field(8, ge=0)
    warmup_tokens: int = Field(4, ge=1)
    shutdown_grace_s: float = Field(30.0, ge=0)
    retry_after_ms: int = Field(500, ge=0)
    # Operations (README "Fleet operations"): cordon/drain state, the active model and the
    # staging area live here, so they survive an agent restart. One directory per node.
    state_dir: Path = Path("studiofleet-node")
    drain_timeout_s: float = Field(120.0, gt=0)    # a drain with no timeout of its own
    # Staged and incoming weights together may take this much; a staging must leave the
    # reserve free on the state directory's disk (RESOURCE_EXHAUSTED otherwise).
    max_staged_gb: float = Field(500.0, gt=0)
    staging_reserve_gb: float = Field(5.0, ge=0)
    # The vLLM engine (README "vLLM nodes"): the agent runs `VLLM_PYTHON -m
    # vllm.entrypoints.openai.api_server` on loopback with the model, --max-model-len and
    # --max-num-seqs set from the settings above, plus `vllm_args` (a list, or one
    # shell-quoted string). Empty python: the agent's own interpreter.
    vllm_python: str = ""
    vllm_args: Annotated[tuple[str, ...], NoDecode] = ()
    vllm_port: int = Field(0, ge=0, le=65535)           # 0: a free loopback port
    vllm_startup_timeout_s: float = Field(600.0, gt=0)
    vllm_restart_max_backoff_s: float = Field(60.0, ge=0)
    # Announce over mDNS (zero-config discovery); `fleet` keeps fleets on one LAN apart.
    mdns: bool = True
    fleet: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    # Security (README "Security"): mTLS with DIR/ca.pem, DIR/crl.pem, DIR/NAME.pem+key;
    # STUDIOFLEET_TLS_DIR also sets the directory. `plaintext` is loopback development only.
    tls_dir: Optional[Path] = None
    tls_name: Optional[str] = None       # the certificate's name; default: the node id
    plaintext: bool = False
    # Monitoring (README "Monitoring"): /metrics on an HTTP(S) port of its own, with the
    # same certificates and roles as gRPC. Empty: the gRPC host, port + 1; "off": none.
    http_listen: HttpListen = ""
    metrics: bool = True
    log_format: str = Field("json", pattern="^(json|text)$")   # JSON lines on stderr, or key=value text
    log_level: str = "INFO"

    @field_validator("vllm_args", mode="before")
    @classmethod
    def _split_args(cls, v):
        return tuple(shlex.split(v)) if isinstance(v, str) else v


class CoordinatorSettings(HttpPortSettings):
    """Everything `fleet-coordinator` needs: where to listen, how to find and judge nodes,
    and how to admit and move requests. The health policy is written out in the README."""

    model_config = SettingsConfigDict(env_prefix="STUDIOFLEET_COORDINATOR_", frozen=True, extra="forbid")
    config_table = "coordinator"

    listen: HostPort = "127.0.0.1:7800"
    # Its name in logs, events, audit records and messages. Default: the certificate's name
    # (--tls-name), or in plaintext mode this host's name; "coordinator" when neither is given.
    coordinator_id: str = ""
    nodes: tuple[HostPort, ...] = ()       # static HOST:PORT list, for networks without multicast
    mdns: bool = True
    mdns_interface: str = "0.0.0.0"        # the address to browse on (127.0.0.1 for a local fleet)
    fleet: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    # Health policy (shared/RELIABILITY.md anchors: probe period 10 s, 3 failures; Envoy
    # ejects for 30 s x n after 5). Tighter here: a clinical stream must not stall for long.
    poll_interval_s: float = Field(1.0, gt=0)
    poll_jitter: float = Field(0.2, ge=0, lt=1)    # +- fraction of the interval
    probe_timeout_s: float = Field(1.0, gt=0)
    eject_after_failures: int = Field(3, ge=1)
    eject_base_s: float = Field(2.0, gt=0)         # ejection n lasts base x n, capped
    eject_max_s: float = Field(60.0, gt=0)
    readmit_after_probes: int = Field(3, ge=1)     # passing probes after the backoff
    ejection_decay_s: float = Field(300.0, gt=0)   # healthy this long: ejection count resets
    # Routing and admission.
    affinity_load_factor: float = Field(1.25, ge=1.0)  # bounded-load consistent hashing
    queue_max_depth: int = Field(256, ge=0)
    queue_max_wait_s: float = Field(10.0, ge=0)
    retry_after_ms: int = Field(500, ge=0)
    max_failovers: int = Field(3, ge=0)            # node moves per request
    # A node call with no first token / no next token for this long moves elsewhere.
    first_token_timeout_s: float = Field(120.0, gt=0)
    stall_timeout_s: float = Field(30.0, gt=0)
    max_tokens_limit: int = Field(4096, ge=1)
    max_stop_sequences: int = Field(8, ge=0)
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Security (README "Security"): mTLS with DIR/ca.pem, DIR/crl.pem, DIR/NAME.pem+key;
    # STUDIOFLEET_TLS_DIR also sets the directory. `plaintext` is loopback development only.
    tls_dir: Optional[Path] = None
    tls_name: Optional[str] = None       # the certificate's name; default: the coordinator id
    plaintext: bool = False
    # Each caller identity may have this many requests in flight (queued included).
    max_concurrent_per_caller: int = Field(64, ge=1)
    # The audit chain (README "Audit"): one record per request and admin action, fsynced
    # before the final chunk goes out. Keys default to AUDIT_DIR-keys, beside the log; in
    # production put them on another volume or host. Off only in plaintext development mode.
    audit: bool = True
    audit_dir: Path = Path("studiofleet-audit")
    audit_key_dir: Optional[Path] = None
    audit_checkpoint_every: int = Field(1000, ge=1)
    audit_checkpoint_interval_s: float = Field(60.0, gt=0)
    audit_max_file_mb: int = Field(64, ge=1)
    # Nodes keep the chain's newest signed HEAD (witnesses). A node holding a record the
    # chain lacks (a cut tail) stops the coordinator (exit 3) unless this is off (alert only).
    audit_witness_refuse: bool = True
    # Rollouts (README "Rollouts"): state in this SQLite file, so a restarted coordinator
    # resumes; a lease in it keeps two coordinators sharing it from running rollouts at once.
    state_db: Path = Path("studiofleet-coordinator.db")
    rollout_lease_s: float = Field(15.0, gt=0)
    # The quality gate after a node activates new weights: smoke generations always, then
    # this command if set (exit 0 passes; env NODE_ID, NODE_ADDRESS, WEIGHTS_DIGEST, ROLLOUT_ID).
    rollout_gate_command: Optional[str] = None
    rollout_gate_timeout_s: float = Field(300.0, gt=0)
    rollout_smoke_requests: int = Field(2, ge=1)
    # The eval gate (README "Clinical notes"): a suite file; a node rejoins only if its score
    # is within the margin of the current version's (measured on it before it is drained).
    rollout_eval_suite: Optional[str] = None
    rollout_eval_margin: float = Field(0.05, ge=0, le=1)
    rollout_eval_min_score: float = Field(0.0, ge=0, le=1)
    rollout_eval_template: str = ""
    # Monitoring (README "Monitoring"): /metrics and the dashboard on an HTTP(S) port of
    # its own (same certificates and roles as gRPC; empty: the gRPC host, port + 1; "off"),
    # and the request log (metadata of every request, never content) in `state_db`.
    http_listen: HttpListen = ""
    metrics: bool = True
    request_log: bool = True
    request_log_retention_days: float = Field(30.0, gt=0)
    slow_ttft_ms: float = Field(2000.0, gt=0)        # `fleetctl requests --slow`, and the TTFT alert's target
    slow_latency_ms: float = Field(60000.0, gt=0)
    dashboard_idle_timeout_s: float = Field(900.0, gt=0)   # HIPAA automatic logoff for browser sessions
    # The OpenAI-compatible front door (README "OpenAI-compatible API"): its own port
    # (empty: the gRPC host, port + 2; "off"), bearer tokens in `state_db`.
    openai_listen: HttpListen = ""
    openai_default_max_tokens: int = Field(2048, ge=1)   # a request without max_tokens: up to this, within the context
    openai_max_body_kb: int = Field(4096, ge=1)          # larger bodies get 413
    log_format: str = Field("json", pattern="^(json|text)$")
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _default_id(self):
        if not self.coordinator_id:
            import socket

            name = self.tls_name or (socket.gethostname().split(".")[0] if self.plaintext else "") or "coordinator"
            object.__setattr__(self, "coordinator_id", name)   # frozen: set once, while validating
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
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, TableSource(settings_cls, cls.config_table)   # no env: typer reads it
