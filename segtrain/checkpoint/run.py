"""The training run directory (this module owns the layout): checkpoints that survive a crash mid-save.

``OUT/checkpoints/`` holds one directory per saved step, ``step_XXXXXXXX/``, and ``latest``, a
one-line file naming the newest complete one. In a step directory DeepSpeed writes the model,
optimizer (ZeRO shards included) and scheduler state: one ``mp_rank_XX_model_states.pt`` per
model-parallel rank (``XX = tp_rank + tp * pp_rank``, :func:`segtrain.parallel.groups.model_parallel_rank`;
its ``"module"`` entry is that rank's state dict: HF names for the portable model, megatron-core
names for the megatron model) and ``*zero_pp_rank_*_optim_states.pt`` for ZeRO. Beside them segtrain
writes ``trainer_state.json`` (step, consumed samples, the whole train config) and each rank's RNG
states.

Saving writes ``step_X.partial/``, then rank 0 renames it to ``step_X/`` and replaces ``latest`` by
rename too: a crash at any point leaves ``latest`` naming a complete checkpoint. Reading
(:func:`open_run`) merges a step's weights into HF names, whatever wrote them: ZeRO 1-3 shards through
DeepSpeed's ``zero_to_fp32``, megatron TP x PP shards through
:func:`segtrain.models.megatron_adapter.megatron_to_hf`.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from segtrain.checkpoint.atomic import write_text_atomic
from segtrain.checkpoint.hf import ConversionError, LazyState
from segtrain.config import ModelConfig, from_dict
from segtrain.parallel.groups import model_parallel_rank

__all__ = [
    "LATEST",
    "TRAINER_STATE",
    "latest_tag",
    "load",
    "load_megatron_shards",
    "open_run",
    "run_tokenizer",
    "save",
    "tag_for",
    "write_megatron_shards",
]

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."  # activation checkpointing's prefix in parameter names
_STEP_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def model_states_file(tag_dir: Path, tp_rank: int = 0, pp_rank: int = 0, tp: int = 1) -> Path:
    return tag_dir / f"mp_rank_{model_parallel_rank(tp_rank, pp_rank, tp):02d}_model_states.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---- saving and resuming a run -------------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(save_dir: str | Path) -> str | None:
    """The tag ``latest`` names, if it names a complete checkpoint."""
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (Path(save_dir) / tag / TRAINER_STATE).is_file() else None


def save(
    engine,
    save_dir: str | Path,
    step: int,
    trainer_state: dict,
    keep_last: int = 0,
    *,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Save a checkpoint for ``step`` atomically; keep the newest ``keep_last`` (0: all). Call on every rank.

    ``before_commit(partial_dir)`` runs on rank 0 when everything is written and nothing renamed yet (tests
    kill the process there).
    """
    save_dir = Path(save_dir)
    tag = tag_for(step)
    partial, final = save_dir / f"{tag}.partial", save_dir / tag
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(save_dir), tag=partial.name, save_latest=False)
    torch.save(rng_state(), partial / f"rng_rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        write_text_atomic(partial / TRAINER_STATE, json.dumps({**trainer_state, "step": step, "time": time.time()}, indent=1))
        if before_commit is not None:
            before_commit(partial)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        write_text_atomic(save_dir / LATEST, tag + "\n")
        if keep_last > 0:
            steps = sorted(p for p in save_dir.iterdir() if p.is_dir() and _STEP_TAG.match(p.name))
            for old in steps[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(engine, save_dir: str | Path, tag: str | None = None) -> dict:
    """Load ``tag`` (default: the latest complete one) into the engine; returns the trainer state."""
    save_dir = Path(save_dir)
    tag = tag or latest_tag(save_dir)
    if tag is None or not (save_dir / tag / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"no complete checkpoint {tag or LATEST!r} in {save_dir}")
    path, _ = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {save_dir / tag}")
    rng = save_dir / tag / f"rng_rank{_rank():05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((save_dir / tag / TRAINER_STATE).read_text())


# ---- megatron shards -----------------------------------------------------------------------------


def load_megatron_shards(checkpoint_tag_dir: str | Path) -> tuple[dict[tuple[int, int], dict[str, Tensor]], int, int]:
    """A step's megatron model shards: ``({(tp_rank, pp_rank): state}, tp, pp)``.

    ``checkpoint_tag_dir`` is ``OUT/checkpoints/step_XXXXXXXX`` (or ``OUT/checkpoints``: its ``latest``).
    """
    path = Path(checkpoint_tag_dir)
    if (path / LATEST).is_file() and not (path / TRAINER_STATE).is_file():
        path = path / (path / LATEST).read_text().strip()
    meta = path / TRAINER_STATE
    if not meta.is_file():
        raise FileNotFoundError(f"{path} is not a segtrain checkpoint: no {TRAINER_STATE}")
    parallel = json.loads(meta.read_text())["config"]["parallel"]
    tp, pp = int(parallel.get("tp", 1)), int(parallel.get("pp", 1))
    shards = {}
    for p in range(pp):
        for r in range(tp):
            file = model_states_file(path, r, p, tp)
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing (tp_rank={r}, pp_rank={p} of tp={tp} x pp={pp})")
            module = torch.load(file, map_location="cpu", weights_only=False)["module"]
            shards[(r, p)] = {k: v for k, v in module.items() if isinstance(v, Tensor)}
    return shards, tp, pp


def write_megatron_shards(out: Path, state: dict, config: ModelConfig, tp: int, pp: int) -> None:
    """Megatron-core shards of an HF-named ``state`` in a step directory's layout (what :func:`load_megatron_shards`
    reads): ``mp_rank_XX_model_states.pt`` (``{"module": shard}``) per TP x PP rank and a ``trainer_state.json``."""
    from segtrain.models.megatron_adapter import hf_to_megatron

    out.mkdir()
    for (r, p), shard in hf_to_megatron(state, config, tp, pp).items():
        torch.save({"module": shard}, model_states_file(out, r, p, tp))
    trainer_state = {"step": 0, "config": {"model": config.to_dict(), "parallel": {"tp": tp, "pp": pp}}}
    (out / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")


# ---- reading a step's weights --------------------------------------------------------------------


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
        file = model_states_file(step_dir)
        if not file.is_file():
            raise ConversionError(f"{step_dir}: no DeepSpeed model states ({file.name}) here")
        # DeepSpeed's own files pickle more than tensors; mmap keeps the weights on disk until read
        state = LazyState.from_tensors(torch.load(file, map_location="cpu", mmap=True, weights_only=False)["module"])
    return unwrapped(state)


def _megatron_state(step_dir: Path, config: ModelConfig) -> LazyState:
    """A megatron model's checkpoint (one ``mp_rank_XX`` file per TP x PP rank) merged into HF names.

    The shards are the ranks' module weights (ZeRO-3 placeholders would fail the shape check); the merge
    holds the whole model in memory, unlike the other sources.
    """
    from segtrain.models.megatron_adapter import megatron_to_hf

    try:
        shards, tp, pp = load_megatron_shards(step_dir)
        return LazyState.from_tensors(megatron_to_hf(shards, config, tp, pp))
    except (KeyError, FileNotFoundError) as e:
        raise ConversionError(f"{step_dir}: {e}") from None


def _is_megatron(step_dir: Path, parallel: dict) -> bool:
    """TP/PP > 1, or megatron-core names in the first model-parallel rank's module."""
    if int(parallel.get("tp", 1)) * int(parallel.get("pp", 1)) > 1:
        return True
    file = model_states_file(step_dir)
    if not file.is_file():
        return False
    module = torch.load(file, map_location="cpu", mmap=True, weights_only=False).get("module") or {}
    return any(k.removeprefix("module.").startswith(("decoder.", "embedding.")) for k in module)


def unwrapped(state: LazyState) -> LazyState:
    """Names without activation checkpointing's wrapper (ZeRO-3 exports and checkpoints of wrapped models keep it)."""
    return state.renamed(lambda name: name.replace(CHECKPOINT_WRAPPER, ""))


def is_run_dir(path: str | Path) -> bool:
    """A ``checkpoints`` directory (it has ``latest``) or one step directory (it has ``trainer_state.json``)."""
    path = Path(path)
    return (path / LATEST).is_file() or (path / TRAINER_STATE).is_file()


def open_run(src: str | Path, tag: str | None = None) -> tuple[ModelConfig, LazyState, Path | None]:
    """``(config, weights in HF names, tokenizer file or None)`` of a ``checkpoints`` dir (its ``latest``, or ``tag``)
    or of one ``step_*`` dir."""
    src = Path(src)
    if tag is not None or (src / LATEST).is_file():
        tag = tag or latest_tag(src)
        if tag is None or not (src / tag).is_dir():
            raise ConversionError(f"{src}: {LATEST!r} names no complete checkpoint (tag {tag!r}); pass --tag step_XXXXXXXX")
        src = src / tag
    state_file = src / TRAINER_STATE
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


def run_tokenizer(checkpoints: Path) -> Path | None:
    """The tokenizer file the run's latest checkpoint names in its config (``data.tokenizer``), if it exists."""
    tag = latest_tag(checkpoints) if checkpoints.is_dir() else None
    if tag is None:
        return None
    data = (json.loads((checkpoints / tag / TRAINER_STATE).read_text()).get("config") or {}).get("data") or {}
    return Path(data["tokenizer"]) if data.get("tokenizer") else None
