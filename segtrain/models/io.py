"""The portable checkpoint directory: ``config.json`` + ``model.safetensors``.

``config.json`` is ``{"format": "segtrain", "format_version": 1, "model": <ModelConfig fields>}``;
``model.safetensors`` holds the state dict under HF Llama names, in the dtype it was saved in. A
tied head is stored once (as ``model.embed_tokens.weight``, as HF does). A Hugging Face Llama
directory loads too (``segtrain.models.hf``): its ``segtrain`` key, or the ``segment_size`` /
``history_policy`` arguments, give the execution; :func:`hf_config_dict` gives ``LlamaConfig`` fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from segtrain.config import ConfigError, ModelConfig, from_dict

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "hf_config_dict",
    "load_config",
    "load_pretrained",
    "load_state_dict_into",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "segtrain"
FORMAT_VERSION = 1


def save_pretrained(model: nn.Module, config: ModelConfig, out_dir: str | Path, *, state_dict: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` (created); returns the directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file({k: tensors[k].clone() for k in sorted(tensors)}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_config(path: str | Path, *, segment_size: int | None = None, history_policy=None) -> ModelConfig:
    """The model config of a checkpoint or HF Llama directory (or of its ``config.json``), with optional execution overrides."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"model: no {CONFIG_NAME} in {path}")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT and "model_type" in meta:  # a Hugging Face directory
        from segtrain.models.hf import config_from_hf

        return config_from_hf(meta, segment_size=segment_size, history_policy=history_policy, source=str(file))
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"model: {file} is not a segtrain checkpoint (format={meta.get('format')!r}) nor an HF config (no model_type)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"model: {file} has format_version {meta.get('format_version')!r}, this build reads {FORMAT_VERSION}")
    overrides = {k: v for k, v in (("segment_size", segment_size), ("history_policy", history_policy)) if v is not None}
    return from_dict(ModelConfig, {**meta["model"], **overrides}, "model")


def _load_state(path: Path, config: ModelConfig | None, device: str = "cpu") -> dict:
    from segtrain.models.hf import is_hf_dir, load_hf_state

    if path.is_dir() and is_hf_dir(path):
        return load_hf_state(path, config, device)
    from safetensors.torch import load_file

    return load_file(str(_weights_file(path)), device=device)


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    return file


def load_state_dict_into(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load a checkpoint or HF directory's (or a ``.safetensors`` file's) weights into ``model``, casting to its dtype."""
    state = _load_state(Path(path), getattr(model, "config", None))
    model.load_state_dict(state, strict=strict)


def load_pretrained(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    segment_size: int | None = None,
    history_policy=None,
):
    """A :class:`LlamaForCausalLM` from a checkpoint or HF Llama directory, in eval mode; stored dtype unless ``dtype`` is given.

    ``segment_size`` / ``history_policy`` override the stored execution (an HF directory without a
    ``segtrain`` key otherwise runs every head ``all``).
    """
    from segtrain.models.llama import LlamaForCausalLM

    config = load_config(path, segment_size=segment_size, history_policy=history_policy)
    state = _load_state(Path(path), config, str(device))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def hf_config_dict(config: ModelConfig) -> dict:
    """Keyword arguments for ``transformers.LlamaConfig`` describing the same architecture."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**rope, **{k: v for k, v in config.rope_scaling.items() if k != "rope_type"}, "rope_type": "llama3"}
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
    )
