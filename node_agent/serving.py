"""What the node serves: one frozen snapshot (model facts, limits, ModelInfo, tokenizer,
grammars), replaced whole by the agent when a model loads and never edited, so a service
reads one consistent model through `serving()` instead of the agent's attributes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.api import common_pb2
from cluster.config import NodeSettings
from node_agent.engine import ModelFacts
from node_agent.grammar import Grammars
from node_agent.validation import Limits


@dataclass(frozen=True)
class Serving:
    facts: ModelFacts | None  # None until a model has loaded
    limits: Limits
    model_info: common_pb2.ModelInfo  # read-only: what status and final chunks report
    tokenizer: Any = None  # the engine's mlx-lm TokenizerWrapper for this model
    grammars: Grammars | None = None  # schema matchers over that tokenizer

    @classmethod
    def nothing(cls, settings: NodeSettings) -> Serving:
        """Before the first load: the configured limits, no model."""
        return cls(
            facts=None,
            limits=Limits(settings.max_tokens_limit, 0, 0, settings.max_stop_sequences),
            model_info=common_pb2.ModelInfo(),
        )
