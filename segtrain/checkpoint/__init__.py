"""Checkpoint formats, one owner each: portable model dirs (:mod:`.portable`), Hugging Face dirs (:mod:`.hf`),
the training run directory (:mod:`.run`). :func:`open_model_source` reads any of them."""

from __future__ import annotations

from pathlib import Path

from segtrain.checkpoint.hf import ConversionError, LazyState, is_hf_dir
from segtrain.checkpoint.portable import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_config,
    load_pretrained,
    load_state_dict_into,
    open_portable,
    save_pretrained,
)

__all__ = [
    "ConversionError",
    "LazyState",
    "load_config",
    "load_pretrained",
    "load_state_dict_into",
    "open_model_source",
    "save_pretrained",
]


def open_model_source(src, tag: str | None = None):
    """``(config, weights in HF names, tokenizer file or None)`` of a portable directory (``OUT/final``), a training
    run's ``checkpoints`` directory (its ``latest``, or ``tag``) or one ``step_*`` directory."""
    from segtrain.checkpoint import run

    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if (src / CONFIG_NAME).is_file() and not is_hf_dir(src):  # portable: config.json + model.safetensors
        if not (src / WEIGHTS_NAME).is_file():
            raise ConversionError(f"{src}: no {WEIGHTS_NAME}")
        config, state = open_portable(src)
        tokenizer = src / "tokenizer.model"
        if not tokenizer.is_file():  # OUT/final: the run's own checkpoints name the tokenizer
            tokenizer = run.run_tokenizer(src.parent / "checkpoints")
        return config, run.unwrapped(state), tokenizer if tokenizer and tokenizer.is_file() else None
    return run.open_run(src, tag)
