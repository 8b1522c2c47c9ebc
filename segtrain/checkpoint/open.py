"""The one way a command opens a model: :func:`open_model` reads any model source segtrain knows.

A source is a portable model directory (``config.json`` + ``model.safetensors``: ``OUT/final``, a
``convert --from hf`` or ``calibrate`` output), a training run directory ``OUT`` (its ``checkpoints``),
a ``checkpoints`` directory (its ``latest``, or ``tag``), one ``step_*`` directory, or a Hugging Face
Llama directory. Opening reads the config and the weights' names and shapes (the tensors load when the
model is built), and finds the tokenizer: the source's own files (:func:`~segtrain.data.tokenizer.holds_tokenizer`),
else the one its training run names (``data.tokenizer``). So a command checks its flags against the
config and the tokenizer before any weight is read.

Also the one list of ``--dtype`` names (:data:`DTYPES`). Imports no torch until a function runs:
``segtrain <command> --help`` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from segtrain.checkpoint.hf import LazyState
    from segtrain.config import ModelConfig
    from segtrain.models.llama import LlamaForCausalLM

__all__ = ["DTYPES", "SOURCES", "ModelSource", "open_model", "torch_dtype"]

DTYPES = ("float32", "bfloat16", "float16", "float64")  # the --dtype names of every command (torch dtype names)
SOURCES = "a model dir (config.json + model.safetensors), a training run dir, its checkpoints, a step_* dir or an HF Llama dir"


def torch_dtype(name: str | None, flag: str = "--dtype") -> torch.dtype | None:
    """The torch dtype a :data:`DTYPES` name names; None for None or ``"auto"`` (each command decides what auto is)."""
    from segtrain.errors import UserError

    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise UserError(f"{flag}: expected auto or one of {', '.join(DTYPES)}, got {name!r}")
    import torch

    return getattr(torch, name)


@dataclass
class ModelSource:
    """An opened model source: its config, its weights in HF names (read on demand, checked by name and shape)
    and the tokenizer it holds or names (a file or directory; None: none found)."""

    path: Path
    kind: str  # "portable", "hf" or "checkpoint" (a training run's step)
    config: ModelConfig
    weights: LazyState
    names: list[str]
    tokenizer: Path | None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in."""
        import torch

        return self.weights.dtypes.get(self.names[0]) or torch.float32

    def build(self, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> LlamaForCausalLM:
        """The model on ``device`` (in ``dtype``, else as stored), in eval mode."""
        import torch

        from segtrain.checkpoint.hf import ConversionError
        from segtrain.models.llama import LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(self.config)
        model.load_state_dict({name: self.weights[name].to(device) for name in self.names}, assign=True, strict=False)
        if self.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ConversionError(f"{self.path}: the weights lack {missing[0]}")
        if dtype is not None:
            model = model.to(dtype=dtype)
        return model.eval()

    def load_tokenizer(self, override: str | os.PathLike | None = None, flag: str = "--tokenizer"):
        """``override`` (a flag's path), else the source's tokenizer, loaded; None when there is neither."""
        from segtrain.data.tokenizer import TokenizerError, load_tokenizer
        from segtrain.userfiles import existing_path

        if override is not None:
            existing_path(override, flag, error=TokenizerError)
        where = override or self.tokenizer
        return None if where is None else load_tokenizer(where)


def open_model(
    source: str | os.PathLike,
    *,
    tag: str | None = None,
    segment_size: int | None = None,
    history_policy=None,
) -> ModelSource:
    """Open ``source`` (see the module docstring); ``tag`` picks a run's checkpoint, ``segment_size`` /
    ``history_policy`` override the stored execution. A wrong source is a ``UserError`` naming the path and what
    was expected there."""
    from segtrain.checkpoint import hf, portable, run
    from segtrain.checkpoint.hf import ConversionError
    from segtrain.config import ModelConfig, from_dict
    from segtrain.data.tokenizer import holds_tokenizer

    path = Path(source)
    if not path.exists():
        raise ConversionError(f"{path}: does not exist (expected {SOURCES})")
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (expected {SOURCES})")
    overrides = {k: v for k, v in (("segment_size", segment_size), ("history_policy", history_policy)) if v is not None}
    own_tokenizer = path if holds_tokenizer(path) else None
    if (path / portable.CONFIG_NAME).is_file():  # portable or HF: one directory with its config and weights
        kind = "hf" if hf.is_hf_dir(path) else "portable"
        if tag is not None:
            raise ConversionError(f"--tag: {path} is a {kind} model dir, not a training run (its checkpoints have tags)")
        config = portable.load_config(path, **overrides)
        if kind == "hf":
            weights = hf.open_hf_weights(path)
        else:
            if not (path / portable.WEIGHTS_NAME).is_file():
                raise ConversionError(f"no {portable.WEIGHTS_NAME} in {path} (a model dir holds it beside config.json)")
            weights = run.unwrapped(portable.open_portable(path)[1])
        tokenizer = own_tokenizer or (None if kind == "hf" else _existing(run.run_tokenizer(path.parent / "checkpoints")))
    else:
        if (path / "checkpoints").is_dir() and not run.is_run_dir(path):  # a run dir OUT: its checkpoints
            path = path / "checkpoints"
        if not run.is_run_dir(path) and not run.checkpoint_tags(path):
            raise ConversionError(f"{path}: not a model (expected {SOURCES})")
        config, weights, tokenizer = run.open_run(path, tag)
        config = from_dict(ModelConfig, {**config.to_dict(), **overrides}, "model") if overrides else config
        tokenizer, kind = own_tokenizer or tokenizer, "checkpoint"
    names = hf.check_tensors(config, weights.shapes, os.fspath(path))
    return ModelSource(path, kind, config, weights, names, tokenizer)


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.exists() else None
