"""``segtrain convert --to hf SRC OUT`` / ``segtrain convert --from hf SRC OUT``: the Hugging Face bridge.

``--to hf`` reads a portable model directory (``OUT/final``), a training run's ``checkpoints`` directory
(its ``latest``, or ``--tag``) or one ``step_*`` directory (DeepSpeed ZeRO 0-3: stages 1-3 are merged
by DeepSpeed's own ``zero_to_fp32``; a megatron model's TP x PP shards by ``megatron_to_hf``), and
writes an HF Llama directory: ``config.json`` (segment size and policies under a ``segtrain`` key),
``model.safetensors`` (sharded with an index past ``--max-shard-size``), ``generation_config.json``
and the tokenizer files.

``--from hf`` reads an HF Llama directory (safetensors, sharded or not, or ``pytorch_model.bin``) and
writes a portable model directory for ``segtrain train --init-from`` and ``segtrain generate``; the
policy comes from ``--policy``/``--segment-size``, a model YAML, the ``segtrain`` key, else ``all``.
With ``--tp``/``--pp`` it also writes the megatron shards of that layout (``OUT/megatron_tpT_ppP/``).

Both directions stream tensor by tensor from lazily opened sources (megatron shards excepted: they are
merged or split in memory) and write into a temporary directory renamed into place at the end: a
failed conversion leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from segtrain.config import ConfigError, ModelConfig, from_dict, load_model_config
from segtrain.models import hf
from segtrain.models.hf import ConversionError, LazyState

__all__ = ["add_arguments", "from_hf", "open_segtrain", "run", "to_hf"]

CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."  # activation checkpointing's prefix in parameter names
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings")  # fmt: skip


# ---- reading segtrain sources --------------------------------------------------------------------


def _deepspeed_state(step_dir: Path) -> LazyState:
    """Model weights of one DeepSpeed checkpoint: fp32 master weights for ZeRO 1-3, the module for ZeRO 0."""
    zero_files = sorted(step_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    state = None
    if zero_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout stays ours
                merged = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name, lazy_mode=True)
        except ValueError as e:
            if "is not a zero checkpoint" not in str(e):  # bf16 without ZeRO: its module holds the weights
                raise ConversionError(f"{step_dir}: DeepSpeed could not merge the ZeRO shards ({e})") from None
        else:
            state = LazyState(
                {k: tuple(v.shape) for k, v in merged.items()},
                {k: v.dtype for k, v in merged.items()},
                lambda name: merged[name].contiguous(),
            )
    if state is None:
        file = step_dir / "mp_rank_00_model_states.pt"
        if not file.is_file():
            raise ConversionError(f"{step_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt) here")
        # DeepSpeed's own files pickle more than tensors; mmap keeps the weights on disk until read
        state = LazyState.from_tensors(torch.load(file, map_location="cpu", mmap=True, weights_only=False)["module"])
    return _unwrapped(state)


def _megatron_state(step_dir: Path, config: ModelConfig) -> LazyState:
    """A megatron model's checkpoint (one ``mp_rank_XX`` file per TP x PP rank) merged into HF names.

    The shards are the ranks' module weights (ZeRO-3 placeholders would fail the shape check); the merge
    holds the whole model in memory, unlike the other sources.
    """
    from segtrain.models.megatron_adapter import load_megatron_shards, megatron_to_hf

    try:
        shards, tp, pp = load_megatron_shards(step_dir)
        return LazyState.from_tensors(megatron_to_hf(shards, config, tp, pp))
    except (KeyError, FileNotFoundError) as e:
        raise ConversionError(f"{step_dir}: {e}") from None


def _is_megatron(step_dir: Path, parallel: dict) -> bool:
    """TP/PP > 1, or megatron-core names in the first model-parallel rank's module."""
    if int(parallel.get("tp", 1)) * int(parallel.get("pp", 1)) > 1:
        return True
    file = step_dir / "mp_rank_00_model_states.pt"
    if not file.is_file():
        return False
    module = torch.load(file, map_location="cpu", mmap=True, weights_only=False).get("module") or {}
    return any(k.removeprefix("module.").startswith(("decoder.", "embedding.")) for k in module)


def _unwrapped(state: LazyState) -> LazyState:
    """Names without activation checkpointing's wrapper (ZeRO-3 exports and checkpoints of wrapped models keep it)."""
    names = {k.replace(CHECKPOINT_WRAPPER, ""): k for k in state.shapes}
    return LazyState({n: state.shapes[k] for n, k in names.items()}, {n: state.dtypes[k] for n, k in names.items()},
                     lambda n: state[names[n]])  # fmt: skip


def open_segtrain(src: str | os.PathLike, tag: str | None = None) -> tuple[ModelConfig, LazyState, Path | None]:
    """``(config, weights, tokenizer file or None)`` of a portable directory, a ``checkpoints`` dir or a ``step_*`` dir."""
    from segtrain.models.io import CONFIG_NAME, WEIGHTS_NAME, load_config
    from segtrain.train.checkpoint import LATEST, latest_tag

    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if (src / CONFIG_NAME).is_file() and not hf.is_hf_dir(src):  # portable: config.json + model.safetensors
        if not (src / WEIGHTS_NAME).is_file():
            raise ConversionError(f"{src}: no {WEIGHTS_NAME}")
        tokenizer = src / "tokenizer.model"
        if not tokenizer.is_file():  # OUT/final: the run's own checkpoints name the tokenizer
            tokenizer = _tokenizer_of_run(src.parent / "checkpoints")
        return (
            load_config(src),
            _unwrapped(hf._safetensors_state([src / WEIGHTS_NAME])),
            tokenizer if tokenizer and tokenizer.is_file() else None,
        )
    if tag is not None or (src / LATEST).is_file():
        tag = tag or latest_tag(src)
        if tag is None or not (src / tag).is_dir():
            raise ConversionError(f"{src}: {LATEST!r} names no complete checkpoint (tag {tag!r}); pass --tag step_XXXXXXXX")
        src = src / tag
    state_file = src / "trainer_state.json"
    if not state_file.is_file():
        raise ConversionError(f"{src}: neither a portable model (config.json), a checkpoints dir ({LATEST}) nor a step dir")
    config = json.loads(state_file.read_text()).get("config") or {}
    if "model" not in config:
        raise ConversionError(f"{state_file}: config.model is missing")
    tokenizer = (config.get("data") or {}).get("tokenizer")
    tokenizer = Path(tokenizer) if tokenizer else None
    model = from_dict(ModelConfig, config["model"], "model")
    state = _megatron_state(src, model) if _is_megatron(src, config.get("parallel") or {}) else _deepspeed_state(src)
    return model, state, tokenizer if tokenizer and tokenizer.exists() else None


def _tokenizer_of_run(checkpoints: Path) -> Path | None:
    from segtrain.train.checkpoint import latest_tag

    tag = latest_tag(checkpoints) if checkpoints.is_dir() else None
    if tag is None:
        return None
    data = (json.loads((checkpoints / tag / "trainer_state.json").read_text()).get("config") or {}).get("data") or {}
    return Path(data["tokenizer"]) if data.get("tokenizer") else None


# ---- output directory ----------------------------------------------------------------------------


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool):
    """A temporary directory beside ``out``, renamed to ``out`` when the block succeeds."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _dtype(name: str, state: LazyState, first: str) -> torch.dtype:
    if name == "auto":
        dtype = state.dtypes.get(first) or torch.float32
        return dtype if dtype in hf.SAFETENSORS_DTYPES else torch.float32
    if name not in hf.DTYPES:
        raise ValueError(f"--dtype: expected auto or one of {list(hf.DTYPES)}, got {name!r}")
    return hf.DTYPES[name]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, dynamic_ncols=True)


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
) -> Path:
    """A segtrain model or training checkpoint -> an HF Llama directory; returns ``out``."""
    from segtrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, write_hf_tokenizer

    config, state, found_tokenizer = open_segtrain(src, tag)
    names = hf.check_tensors(config, state.shapes, os.fspath(src))
    out_dtype = _dtype(dtype, state, names[0])
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    sizes = {n: itemsize * int(torch.Size(state.shapes[n]).numel()) for n in names}
    shards = hf.plan_shards(sizes, hf.parse_size(max_shard_size))
    tokenizer = Path(tokenizer) if tokenizer else found_tokenizer
    out = Path(out)
    with _staged(out, overwrite) as tmp, _progress(sum(sizes.values()), "to hf", progress) as bar:
        files = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]  # fmt: skip
        for file, shard in zip(files, shards):
            hf.write_safetensors(tmp / file, shard, state.shapes, out_dtype, state.__getitem__, on_tensor=bar.update)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {n: file for file, shard in zip(files, shards) for n in shard},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_config = hf.config_to_hf(config, out_dtype, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, tmp, model_max_length=config.max_position_embeddings)
        else:
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
    from segtrain.models.io import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME

    src = Path(src)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}: no config.json")
    config = _execution_config(
        json.loads((src / "config.json").read_text()),
        os.fspath(src / "config.json"),
        segment_size=segment_size,
        policy=policy,
        model_config=model_config,
    )
    state = hf.open_hf_weights(src)
    names = hf.check_tensors(config, state.shapes, os.fspath(src))
    if tp * pp > 1:
        from segtrain.models.megatron_adapter import check_layout

        check_layout(config, tp, pp)  # before anything is written
    out_dtype = _dtype(dtype, state, names[0])
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    total = sum(itemsize * int(torch.Size(state.shapes[n]).numel()) for n in names)
    out = Path(out)
    with _staged(out, overwrite) as tmp, _progress(total, "from hf", progress) as bar:
        hf.write_safetensors(tmp / WEIGHTS_NAME, sorted(names), state.shapes, out_dtype, state.__getitem__, on_tensor=bar.update)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if tp * pp > 1:
            _write_megatron(tmp / f"megatron_tp{tp}_pp{pp}", {n: state[n].to(out_dtype) for n in names}, config, tp, pp)
        for file in [*src.glob("tokenizer*"), src / "special_tokens_map.json"]:
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
    return out


def _write_megatron(out: Path, state: dict, config: ModelConfig, tp: int, pp: int) -> None:
    """Megatron-core shards in the layout of a training checkpoint's tag dir (what ``load_megatron_shards`` reads):
    ``mp_rank_XX_model_states.pt`` (``{"module": shard}``) per TP x PP rank and a ``trainer_state.json``."""
    from segtrain.models.megatron_adapter import hf_to_megatron, model_parallel_rank

    out.mkdir()
    for (r, p), shard in hf_to_megatron(state, config, tp, pp).items():
        torch.save({"module": shard}, out / f"mp_rank_{model_parallel_rank(r, p, tp):02d}_model_states.pt")
    trainer_state = {"step": 0, "config": {"model": config.to_dict(), "parallel": {"tp": tp, "pp": pp}}}
    (out / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")


# ---- command line --------------------------------------------------------------------------------


def add_arguments(p, direction: str | None = None) -> None:
    if direction is None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--to", choices=["hf"], help="segtrain model or training checkpoint -> Hugging Face directory")
        group.add_argument("--from", dest="from_", choices=["hf"], help="Hugging Face directory -> segtrain model directory")
    p.add_argument("src", help="source: a model dir, a run's checkpoints dir or a step_* dir (--to hf); an HF dir (--from hf)")
    p.add_argument("out", help="output directory (written to a temporary directory, then renamed)")
    p.add_argument("--dtype", default="auto", help="auto (the stored dtype), float32, bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    to = p.add_argument_group("--to hf")
    to.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this size (default 5GB, as HF)")
    to.add_argument("--tokenizer", help="sentencepiece model to include (default: the source's or its run's tokenizer)")
    to.add_argument("--tag", help="checkpoint tag in a checkpoints dir (default: the one 'latest' names)")
    fr = p.add_argument_group("--from hf")
    fr.add_argument("--segment-size", type=int, help="segment size (default: the config's segtrain key, else 4096)")
    fr.add_argument(
        "--policy",
        "--history-policy",
        dest="policy",
        type=hf.parse_policy_arg,
        help="history policy: 'all', 'sink:4+window:1024', '{first_k: 1}' or a per-layer YAML list "
        "(default: the config's segtrain key, else 'all', which equals full attention)",
    )
    fr.add_argument(
        "--model-config", help="a model YAML (or flavor) whose segment size and policy to use; must match the HF model"
    )
    fr.add_argument("--tp", type=int, default=1, help="also write megatron shards for this tensor-parallel size")
    fr.add_argument("--pp", type=int, default=1, help="also write megatron shards for this pipeline-parallel size")


def run(args, direction: str | None = None) -> int:
    from segtrain.data.tokenizer import TokenizerError
    from segtrain.policy import PolicyError

    direction = direction or ("to" if getattr(args, "to", None) else "from")
    try:
        common = dict(dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
        if direction == "to":
            out = to_hf(args.src, args.out, max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, tag=args.tag, **common)
        else:
            out = from_hf(
                args.src, args.out, segment_size=args.segment_size, policy=args.policy, model_config=args.model_config,
                tp=args.tp, pp=args.pp, **common,
            )  # fmt: skip
    except (ConfigError, ConversionError, PolicyError, TokenizerError, FileNotFoundError, ValueError) as e:
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
