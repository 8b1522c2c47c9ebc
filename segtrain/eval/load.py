"""Loading what ``segtrain eval`` evaluates: a segtrain model dir (``OUT/final``), a training run's checkpoints
(``OUT/checkpoints``: its ``latest``; or one ``step_*`` dir), or a Hugging Face Llama directory."""

from __future__ import annotations

from pathlib import Path

import torch

from segtrain.models.llama import LlamaForCausalLM

__all__ = ["load_model"]


def load_model(
    path: str | Path, *, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[LlamaForCausalLM, Path | None]:
    """``(model in eval mode, the tokenizer file the source names or holds, else None)``.

    Fails with :class:`~segtrain.checkpoint.ConversionError`, ``FileNotFoundError`` or
    :class:`~segtrain.config.ConfigError`, each naming the path, when there is no model there.
    """
    from segtrain.checkpoint import ConversionError, load_pretrained, open_model_source
    from segtrain.checkpoint.hf import is_hf_dir

    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (give a segtrain model dir, a run's checkpoints or an HF Llama dir)")
    if is_hf_dir(path):
        tokenizer = path if any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json")) else None
        return load_pretrained(path, device=device, dtype=dtype), tokenizer
    config, state, tokenizer = open_model_source(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    weights = {name: state[name].to(device) for name in state.keys()}  # noqa: SIM118 (LazyState is not a dict)
    model.load_state_dict(weights, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ConversionError(f"{path}: the weights lack {missing[0]}")
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval(), tokenizer
