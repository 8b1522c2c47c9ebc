"""The portable model directory: ``config.json`` + ``model.safetensors`` (this module owns the format).

``config.json`` is ``{"format": "segtrain", "format_version": 1, "model": <ModelConfig fields>}``;
``model.safetensors`` holds the state dict under HF Llama names, in the dtype it was saved in. A
tied head is stored once (as ``model.embed_tokens.weight``, as HF does). Loading also accepts a
Hugging Face Llama directory (:mod:`segtrain.checkpoint.hf`): its ``segtrain`` key, or the
``segment_size`` / ``history_policy`` arguments, give the execution. Directories are written whole
or not at all (a temporary directory renamed into place).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from segtrain.checkpoint import hf
from segtrain.checkpoint.atomic import staged_dir
from segtrain.config import ConfigError, ModelConfig, from_dict
from segtrain.userfiles import read_json

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "load_config",
    "load_pretrained",
    "load_state_dict_into",
    "open_portable",
    "save_pretrained",
    "write_portable",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.model"
FORMAT = "segtrain"
FORMAT_VERSION = 1


def _meta(config: ModelConfig) -> str:
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}, indent=2) + "\n"


def write_portable(
    out: Path,
    config: ModelConfig,
    names: Iterable[str],
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    get: Callable[[str], torch.Tensor],
    *,
    on_tensor: Callable[[int], None] | None = None,
) -> Path:
    """Write the directory's two files into an existing (staging) directory ``out``, streaming tensor by tensor."""
    hf.write_safetensors(out / WEIGHTS_NAME, sorted(names), shapes, dtype, get, on_tensor=on_tensor)
    (out / CONFIG_NAME).write_text(_meta(config))
    return out


def save_pretrained(
    model: nn.Module | None,
    config: ModelConfig,
    out_dir: str | Path,
    *,
    state_dict: dict | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` (replaced whole); returns the directory.

    ``tokenizer``: a sentencepiece file copied in as ``tokenizer.model``, so ``segtrain generate --model out_dir``
    and ``segtrain convert`` find it."""
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach() for k, v in state.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    from safetensors.torch import save_file

    with staged_dir(out_dir) as tmp:
        save_file({k: tensors[k].to("cpu").contiguous().clone() for k in sorted(tensors)}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})  # fmt: skip
        (tmp / CONFIG_NAME).write_text(_meta(config))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_NAME)
    out = Path(out_dir)
    for file in (out / WEIGHTS_NAME, out / CONFIG_NAME, out / TOKENIZER_NAME):
        if file.is_file():
            file.chmod(0o644)  # readable like any model file, not only by the training user
    return out


def load_config(path: str | Path, *, segment_size: int | None = None, history_policy=None) -> ModelConfig:
    """The model config of a portable or HF Llama directory (or of its ``config.json``), with optional execution overrides."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"model: no {CONFIG_NAME} in {path}")
    meta = read_json(file, error=ConfigError)
    if meta.get("format") != FORMAT and "model_type" in meta:  # a Hugging Face directory
        return hf.config_from_hf(meta, segment_size=segment_size, history_policy=history_policy, source=str(file))
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"model: {file} is not a segtrain checkpoint (format={meta.get('format')!r}) nor an HF config (no model_type)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"model: {file} has format_version {meta.get('format_version')!r}, this build reads {FORMAT_VERSION}")
    overrides = {k: v for k, v in (("segment_size", segment_size), ("history_policy", history_policy)) if v is not None}
    return from_dict(ModelConfig, {**meta["model"], **overrides}, "model")


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    return file


def open_portable(path: str | Path) -> tuple[ModelConfig, hf.LazyState]:
    """``(config, weights)`` of a portable directory; weights are read lazily, tensor by tensor."""
    path = Path(path)
    return load_config(path), hf.safetensors_state([_weights_file(path)])


def load_state_dict_into(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load a model source's weights (:func:`~segtrain.checkpoint.open.open_model`: a model dir, a training run, a
    checkpoint, an HF dir) or a ``.safetensors`` file's into ``model``, casting to its dtype."""
    path = Path(path)
    if path.is_dir():
        from segtrain.checkpoint.open import open_model

        source = open_model(path)
        state = {name: source.weights[name] for name in source.names}
    else:
        from safetensors.torch import load_file

        state = load_file(str(_weights_file(path)))
    model.load_state_dict(state, strict=strict)


def load_pretrained(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    segment_size: int | None = None,
    history_policy=None,
):
    """A :class:`LlamaForCausalLM` from any model source (:func:`~segtrain.checkpoint.open.open_model`), in eval mode;
    stored dtype unless ``dtype`` is given.

    ``segment_size`` / ``history_policy`` override the stored execution (an HF directory without a
    ``segtrain`` key otherwise runs every head ``all``).
    """
    from segtrain.checkpoint.open import open_model

    source = open_model(path, segment_size=segment_size, history_policy=history_policy)
    return source.build(device=device, dtype=dtype)
