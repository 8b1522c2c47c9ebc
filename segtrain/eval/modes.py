"""Execution modes: how a model's attention runs at evaluation, whatever it was trained with.

- ``full``: plain causal attention. One segment covers the whole input (``segment_size`` >= its
  length) and every head reads ``all``: for one segment this is exactly causal attention.
- ``segmented``: the model's own segment size and policy table, or the ``segment_size`` / ``policy``
  overrides (same syntax as ``segtrain convert --policy``): what a segmented server computes.

:func:`executed_as` gives a model that shares the loaded weights (no copy) but whose config says the
mode, so the parallel forward and :class:`~segtrain.inference.SegmentedEngine` both follow it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from segtrain.config import ConfigError, ModelConfig
from segtrain.models.llama import LlamaForCausalLM

__all__ = ["MODES", "ExecutionMode", "executed_as", "parse_modes"]

MODES = ("full", "segmented")


@dataclass(frozen=True)
class ExecutionMode:
    """``kind`` is ``full`` or ``segmented``; ``segment_size`` / ``policy`` override the model's (segmented only)."""

    kind: str
    segment_size: int | None = None
    policy: str | dict | list | None = None

    @property
    def name(self) -> str:
        if self.kind == "full" or (self.segment_size is None and self.policy is None):
            return self.kind
        parts = ([f"S={self.segment_size}"] if self.segment_size else []) + (
            [f"policy={_short(self.policy)}"] if self.policy else []
        )
        return f"segmented({', '.join(parts)})"

    def config(self, base: ModelConfig, length: int) -> ModelConfig:
        """The model config that runs this mode on inputs of ``length`` tokens (errors name the field)."""
        if self.kind == "full":
            return dataclasses.replace(base, segment_size=max(length, base.segment_size), history_policy="all")
        changes = {}
        if self.segment_size is not None:
            changes["segment_size"] = self.segment_size
        if self.policy is not None:
            changes["history_policy"] = self.policy
        return dataclasses.replace(base, **changes) if changes else base

    def segment_size_for(self, base: ModelConfig) -> int:
        """The segment size this mode runs with (for ``full``: the model's, which only sets the reporting buckets)."""
        return self.segment_size or base.segment_size


def _short(policy) -> str:
    if isinstance(policy, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in policy.items()) + "}"
    return str(policy)


def parse_modes(text: str, *, segment_size: int | None = None, policy=None) -> list[ExecutionMode]:
    """``full``, ``segmented`` or ``full,segmented``; the overrides apply to ``segmented``."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in MODES]
    if not names or unknown:
        raise ConfigError(
            f"--mode: {unknown[0] if unknown else text!r} is not a mode; choose from {list(MODES)} (comma-separated)"
        )
    if segment_size is not None and (isinstance(segment_size, bool) or segment_size < 1):
        raise ConfigError(f"--segment-size: must be a positive integer, got {segment_size!r}")
    return [
        ExecutionMode(n) if n == "full" else ExecutionMode(n, segment_size=segment_size, policy=policy)
        for n in dict.fromkeys(names)
    ]


def executed_as(model: LlamaForCausalLM, mode: ExecutionMode, length: int) -> LlamaForCausalLM:
    """``model``'s weights (shared, not copied) under the config of ``mode`` for inputs of ``length`` tokens."""
    config = mode.config(model.config, length)
    if config == model.config:
        return model
    with torch.device("meta"):
        twin = LlamaForCausalLM(config, loss_chunk_size=model.loss_chunk_size)
    twin.load_state_dict(model.state_dict(), assign=True)
    if config.tie_word_embeddings:
        twin.lm_head.weight = twin.model.embed_tokens.weight
    return twin.eval()
