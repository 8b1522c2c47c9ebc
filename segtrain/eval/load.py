"""A model and the tokenizer it carries, in one call: :func:`~segtrain.checkpoint.open.open_model`, then build.

For callers that need nothing between opening and building (the lm-eval harness, studies); ``segtrain eval``
opens first, so it checks its flags against the config and the tokenizer before the weights load."""

from __future__ import annotations

from pathlib import Path

import torch

from segtrain.models.llama import LlamaForCausalLM

__all__ = ["load_model"]


def load_model(
    path: str | Path, *, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[LlamaForCausalLM, Path | None]:
    """``(model in eval mode, the tokenizer file or directory the source holds or names, else None)``."""
    from segtrain.checkpoint.open import open_model

    source = open_model(path)
    return source.build(device=device, dtype=dtype), source.tokenizer
