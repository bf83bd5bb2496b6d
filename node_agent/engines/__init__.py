"""Engines are plug-ins selected by name."""

from __future__ import annotations

from typing import Callable

from cluster.config import NodeSettings
from node_agent.engine import Engine


def _mlx(settings: NodeSettings) -> Engine:
    from node_agent.engines.mlx_engine import MlxEngine

    kind, extra = MlxEngine, {}
    if settings.group:  # one rank of a node group (docs/node-groups.md)
        from node_agent.group import GroupSpec
        from node_agent.group_engine import GroupMlxEngine

        kind, extra = (
            GroupMlxEngine,
            {
                "group": GroupSpec.from_settings(settings),
                "staging_root": settings.state_dir / "models",
            },
        )
    return kind(
        **extra,
        model_path=settings.model_path,
        model_id=settings.model_id,
        max_running=settings.max_running,
        prefill_batch_size=settings.prefill_batch_size,
        prefill_step_size=settings.prefill_step_size,
        max_context_tokens=settings.max_context_tokens,
        prompt_cache_entries=settings.prompt_cache_entries,
        prompt_cache_bytes=settings.prompt_cache_bytes,
    )


def _vllm(settings: NodeSettings) -> Engine:
    from node_agent.engines.vllm_engine import VllmEngine

    return VllmEngine(
        model_path=settings.model_path,
        model_id=settings.model_id,
        max_running=settings.max_running,
        max_context_tokens=settings.max_context_tokens,
        state_dir=settings.state_dir,
        python=settings.vllm_python,
        extra_args=settings.vllm_args,
        port=settings.vllm_port,
        startup_timeout_s=settings.vllm_startup_timeout_s,
        restart_max_backoff_s=settings.vllm_restart_max_backoff_s,
    )


def _upstream(settings: NodeSettings) -> Engine:
    from node_agent.engines.upstream_engine import UpstreamEngine

    return UpstreamEngine(
        model_path=settings.model_path,
        model_id=settings.model_id,
        max_running=settings.max_running,
        max_context_tokens=settings.max_context_tokens,
        url=settings.upstream_url,
        served_model=settings.upstream_model,
        key_file=settings.upstream_key_file,
        kind=settings.upstream_kind,
        digest=settings.upstream_digest,
        weights_check=settings.upstream_weights_check,
        ca_file=settings.upstream_ca_file,
        max_backoff_s=settings.upstream_max_backoff_s,
    )


ENGINES: dict[str, Callable[[NodeSettings], Engine]] = {
    "mlx": _mlx,
    "vllm": _vllm,
    "upstream": _upstream,
}


def make_engine(settings: NodeSettings) -> Engine:
    try:
        factory = ENGINES[settings.engine]
    except KeyError:
        raise ValueError(
            f"unknown engine {settings.engine!r}; available: {', '.join(ENGINES)}"
        ) from None
    return factory(settings)
