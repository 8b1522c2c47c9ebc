"""``segtrain convert --to hf SRC OUT`` / ``segtrain convert --from hf SRC OUT``: the Hugging Face bridge.

``--to hf`` reads what :func:`~segtrain.checkpoint.open.open_model` opens: a portable model directory
(``OUT/final``), a training run directory or its ``checkpoints`` (its ``latest``, or ``--tag``), one
``step_*`` directory (DeepSpeed ZeRO 0-3: stages 1-3 are merged by DeepSpeed's own ``zero_to_fp32``; a
megatron model's TP x PP shards by ``megatron_to_hf``) or an HF Llama directory, and
writes an HF directory that transformers runs with segment attention: ``config.json`` (segment size and
policies under a ``segtrain`` key, ``auto_map`` to ``modeling_segtrain.py``), ``modeling_segtrain.py``,
``model.safetensors`` (sharded with an index past ``--max-shard-size``), ``generation_config.json`` and the
tokenizer files. ``--plain-llama`` writes a plain ``LlamaForCausalLM`` instead: it loads without remote code
and runs full attention, which changes the outputs of any model whose heads do not all read all history.

``--from hf`` reads an HF Llama directory (safetensors, sharded or not, or ``pytorch_model.bin``) and
writes a portable model directory for ``segtrain train --init-from`` and ``segtrain generate``; the
policy comes from ``--policy``/``--segment-size``, a model YAML, the ``segtrain`` key, else ``all``.
With ``--tp``/``--pp`` it also writes the megatron shards of that layout (``OUT/megatron_tpT_ppP/``).

Both directions stream tensor by tensor from lazily opened sources (megatron shards excepted: they are
merged or split in memory) and write into a temporary directory renamed into place at the end: a
failed conversion leaves no half-written output.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from segtrain.checkpoint.open import DTYPES

if TYPE_CHECKING:  # imported where used: `segtrain convert --help` must not wait for torch
    import torch

    from segtrain.checkpoint.hf import LazyState
    from segtrain.config import ModelConfig

__all__ = ["add_arguments", "from_hf", "run", "to_hf"]

ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings")  # fmt: skip


def _staged(out: Path, overwrite: bool):
    from segtrain.checkpoint.atomic import staged_dir
    from segtrain.checkpoint.hf import ConversionError

    return staged_dir(out, overwrite=overwrite, error=ConversionError)


def _dtype(name: str, state: LazyState, first: str) -> torch.dtype:
    import torch

    from segtrain.checkpoint import hf
    from segtrain.checkpoint.open import torch_dtype

    if name == "auto":
        dtype = state.dtypes.get(first) or torch.float32
        return dtype if dtype in hf.SAFETENSORS_DTYPES else torch.float32
    return torch_dtype(name)


def _progress(total: int, desc: str, enabled: bool):
    from segtrain.progress import show_progress

    return show_progress(total=total, desc=desc, unit_bytes=True, enabled=enabled)


# ---- the two directions --------------------------------------------------------------------------


def to_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    tokenizer: str | os.PathLike | None = None,
    tag: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    plain_llama: bool = False,
) -> Path:
    """A segtrain model or training checkpoint -> an HF directory (segment attention, or ``plain_llama``); returns ``out``."""
    import torch

    from segtrain.checkpoint import hf
    from segtrain.checkpoint.open import open_model
    from segtrain.data.tokenizer import MODEL_FILE, copy_tokenizer

    source = open_model(src, tag=tag)
    config, state, names, found_tokenizer = source.config, source.weights, source.names, source.tokenizer
    out_dtype = _dtype(dtype, state, names[0])
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    total = sum(itemsize * int(torch.Size(state.shapes[n]).numel()) for n in names)
    tokenizer = Path(tokenizer) if tokenizer else found_tokenizer
    # a directory without a sentencepiece model (an HF tokenizer): its files are copied as they are
    hf_files = tokenizer if tokenizer is not None and tokenizer.is_dir() and not (tokenizer / MODEL_FILE).is_file() else None
    out = Path(out)
    with _staged(out, overwrite) as tmp, _progress(total, "to hf", progress) as bar:
        hf.write_hf_dir(tmp, config, state, names, out_dtype, max_shard_size=max_shard_size,
                        tokenizer=None if hf_files else tokenizer, on_tensor=bar.update, plain_llama=plain_llama)  # fmt: skip
        if hf_files is not None:
            copy_tokenizer(hf_files, tmp)
    bounded = sorted({str(p) for row in config.policy_table().layers for p in row} - {"all"})
    if plain_llama and bounded:
        print(
            f"segtrain convert: note: --plain-llama: transformers will run full attention, but heads of this model read "
            f"{', '.join(bounded)} (segment size {config.segment_size}); its outputs will differ from segtrain's",
            file=sys.stderr,
        )
    if tokenizer is None:
        print(f"segtrain convert: note: no tokenizer found for {src}; pass --tokenizer to include one", file=sys.stderr)
    return out


def _execution_config(
    hf_config: dict,
    source: str,
    *,
    segment_size: int | None,
    policy,
    model_config: str | os.PathLike | None,
) -> ModelConfig:
    """The HF architecture with segtrain's execution from flags, a model YAML, the ``segtrain`` key or defaults."""
    from segtrain.checkpoint import hf
    from segtrain.config import ConfigError, ModelConfig, from_dict, load_model_config

    config = hf.config_from_hf(hf_config, source=source)
    if model_config is not None:
        wanted = load_model_config(model_config)
        for name in ARCH_FIELDS:
            if getattr(wanted, name) != getattr(config, name):
                raise ConfigError(
                    f"model.{name}: {model_config} says {getattr(wanted, name)!r}, the HF model has {getattr(config, name)!r}"
                )
        config = wanted
    overrides = {"segment_size": segment_size, "history_policy": policy}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return from_dict(ModelConfig, {**config.to_dict(), **overrides}, "model") if overrides else config


def from_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    segment_size: int | None = None,
    policy=None,
    model_config: str | os.PathLike | None = None,
    dtype: str = "auto",
    tp: int = 1,
    pp: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """An HF Llama directory -> a portable segtrain model directory; returns ``out``."""
    import torch

    from segtrain.checkpoint.hf import ConversionError
    from segtrain.checkpoint.open import open_model
    from segtrain.checkpoint.portable import write_portable
    from segtrain.checkpoint.run import write_megatron_shards
    from segtrain.data.tokenizer import copy_tokenizer
    from segtrain.userfiles import read_json

    src = Path(src)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}: no config.json (expected a Hugging Face Llama dir)")
    source = open_model(src)  # the architecture and the weights, checked against it
    if source.kind != "hf":
        raise ConversionError(f"{src}: a segtrain model dir, not a Hugging Face Llama dir (its config.json has no model_type)")
    config = _execution_config(
        read_json(src / "config.json", error=ConversionError),
        os.fspath(src / "config.json"),
        segment_size=segment_size,
        policy=policy,
        model_config=model_config,
    )
    state, names = source.weights, source.names  # the architecture is the source's (_execution_config checks it)
    if tp * pp > 1:
        from segtrain.models.megatron_adapter import check_layout

        check_layout(config, tp, pp)  # before anything is written
    out_dtype = _dtype(dtype, state, names[0])
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    total = sum(itemsize * int(torch.Size(state.shapes[n]).numel()) for n in names)
    out = Path(out)
    with _staged(out, overwrite) as tmp, _progress(total, "from hf", progress) as bar:
        write_portable(tmp, config, names, state.shapes, out_dtype, state.__getitem__, on_tensor=bar.update)
        if tp * pp > 1:
            shards = tmp / f"megatron_tp{tp}_pp{pp}"
            write_megatron_shards(shards, {n: state[n].to(out_dtype) for n in names}, config, tp, pp)
        copy_tokenizer(src, tmp)
    return out


# ---- command line --------------------------------------------------------------------------------


def add_arguments(p, direction: str | None = None) -> None:
    if direction is None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--to", choices=["hf"], help="segtrain model or training checkpoint -> Hugging Face directory")
        group.add_argument("--from", dest="from_", choices=["hf"], help="Hugging Face directory -> segtrain model directory")
    p.add_argument(
        "src", help="source: a model dir, a training run dir, its checkpoints or a step_* dir (--to hf); an HF dir (--from hf)"
    )
    p.add_argument("out", help="output directory (written to a temporary directory, then renamed)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: the stored dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    to = p.add_argument_group("--to hf")
    to.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this size (default 5GB, as HF)")
    to.add_argument("--tokenizer", help="sentencepiece model to include (default: the source's or its run's tokenizer)")
    to.add_argument("--tag", help="checkpoint tag in a checkpoints dir (default: the one 'latest' names)")
    to.add_argument(
        "--plain-llama",
        action="store_true",
        help="write a plain LlamaForCausalLM (no remote code) instead of the segment-attention model: transformers, vLLM "
        "and SGLang then run FULL ATTENTION, WHICH CHANGES THE MODEL'S BEHAVIOUR unless every head's policy is 'all' "
        "(the default export runs segment attention, loaded with trust_remote_code=True)",
    )
    fr = p.add_argument_group("--from hf")
    fr.add_argument("--segment-size", type=int, help="segment size (default: the config's segtrain key, else 4096)")
    fr.add_argument(
        "--policy",
        "--history-policy",
        dest="policy",
        type=_policy_arg,
        help="history policy: 'all', 'sink:4+window:1024', '{first_k: 1}', a per-layer YAML list, or "
        "'calibrated:PATH[@BUDGET]' (the heads `segtrain calibrate` chose, PATH its output dir or calibration.json; "
        "@BUDGET re-picks the top fraction) (default: the config's segtrain key, else 'all', which equals full attention)",
    )
    fr.add_argument(
        "--model-config", help="a model YAML (or flavor) whose segment size and policy to use; must match the HF model"
    )
    fr.add_argument("--tp", type=int, default=1, help="also write megatron shards for this tensor-parallel size")
    fr.add_argument("--pp", type=int, default=1, help="also write megatron shards for this pipeline-parallel size")


def _policy_arg(text: str):
    from segtrain.checkpoint.hf import parse_policy_arg

    return parse_policy_arg(text)


def run(args, direction: str | None = None) -> int:
    from segtrain.errors import UserError
    from segtrain.userfiles import existing_path

    direction = direction or ("to" if getattr(args, "to", None) else "from")
    try:
        existing_path(args.src, "src", kind="dir")
        if args.tokenizer:
            existing_path(args.tokenizer, "--tokenizer")
        common = dict(dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
        if direction == "to":
            out = to_hf(args.src, args.out, max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, tag=args.tag,
                        plain_llama=args.plain_llama, **common)  # fmt: skip
        else:
            out = from_hf(
                args.src, args.out, segment_size=args.segment_size, policy=args.policy, model_config=args.model_config,
                tp=args.tp, pp=args.pp, **common,
            )  # fmt: skip
    except (UserError, FileNotFoundError, ValueError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"segtrain convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(direction: str, argv: list[str] | None = None) -> int:
    """Entry point of ``tools/convert_to_hf.py`` / ``tools/convert_from_hf.py`` (one direction, same options)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"convert_{direction}_hf", description=__doc__.splitlines()[0])
    add_arguments(p, direction)
    return run(p.parse_args(argv), direction)
