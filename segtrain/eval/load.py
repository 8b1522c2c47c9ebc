"""Loading what ``segtrain eval`` evaluates: a segtrain model dir (``OUT/final``), a training run's checkpoints
(``OUT/checkpoints``: its ``latest``; or one ``step_*`` dir), or a Hugging Face Llama directory.

Opening (:func:`open_source`: config, lazily read weights, tokenizer) is apart from building the model
(:func:`build_model`), so a command checks its flags against the config and tokenizer before the weights load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from segtrain.checkpoint import LazyState
from segtrain.config import ModelConfig
from segtrain.models.llama import LlamaForCausalLM

__all__ = ["ModelSource", "build_model", "load_model", "open_source"]


@dataclass
class ModelSource:
    """A model path, opened: its config, its weights (read on demand, checked by name and shape) and the
    tokenizer it holds or names (None: none found)."""

    path: Path
    config: ModelConfig
    weights: LazyState
    names: list[str]
    tokenizer: Path | None


def open_source(path: str | Path) -> ModelSource:
    """Fails with a ``UserError`` naming the path when there is no model there (see the module docstring for what
    is read)."""
    from segtrain.checkpoint import ConversionError, load_config, open_model_source
    from segtrain.checkpoint.hf import check_tensors, is_hf_dir, open_hf_weights

    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (give a segtrain model dir, a run's checkpoints or an HF Llama dir)")
    if is_hf_dir(path):
        config, weights = load_config(path), open_hf_weights(path)
        tokenizer = path if any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json")) else None
    else:
        config, weights, tokenizer = open_model_source(path)
    return ModelSource(path, config, weights, check_tensors(config, weights.shapes, str(path)), tokenizer)


def build_model(source: ModelSource, *, device: torch.device, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """The model of ``source`` on ``device`` (in ``dtype``, else as stored), in eval mode."""
    from segtrain.checkpoint import ConversionError

    with torch.device("meta"):
        model = LlamaForCausalLM(source.config)
    model.load_state_dict({name: source.weights[name].to(device) for name in source.names}, assign=True, strict=False)
    if source.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ConversionError(f"{source.path}: the weights lack {missing[0]}")
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def load_model(
    path: str | Path, *, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[LlamaForCausalLM, Path | None]:
    """``(model in eval mode, the tokenizer file the source names or holds, else None)``."""
    source = open_source(path)
    return build_model(source, device=device, dtype=dtype), source.tokenizer
