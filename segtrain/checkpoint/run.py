"""The training run directory (this module owns the layout): checkpoints that survive a crash mid-save.

``OUT/checkpoints/`` holds one directory per saved step, ``step_XXXXXXXX/``, and ``latest``, a
one-line file naming the newest complete one. In a step directory DeepSpeed writes the model,
optimizer (ZeRO shards included) and scheduler state: one ``mp_rank_XX_model_states.pt`` per
model-parallel rank (``XX = tp_rank + tp * pp_rank``, :func:`segtrain.parallel.groups.model_parallel_rank`;
its ``"module"`` entry is that rank's state dict: HF names for the portable model, megatron-core
names for the megatron model) and ``*zero_pp_rank_*_optim_states.pt`` for ZeRO. Beside them segtrain
writes ``trainer_state.json`` (step, consumed samples, the whole train config) and each rank's RNG
states.

Saving writes ``step_X.partial/``, then rank 0 lists every file with its size in ``manifest.json`` (the
completeness marker), renames the directory to ``step_X/`` and replaces ``latest`` by rename too: a
crash at any point leaves ``latest`` naming a complete checkpoint. Only then are older checkpoints
pruned (never the one just written). Loading checks the manifest: a damaged checkpoint is skipped for
the newest good one, with a warning naming the file (:func:`find_checkpoint`).

The run directory ``OUT/`` belongs to one run: ``run.json`` records its identity (start time, config
hash), and a new run refuses a folder that holds another run's checkpoints unless told to continue it
(``--resume auto``) or to replace it (``--overwrite``): :func:`plan_start`. Reading
(:func:`open_run`) merges a step's weights into HF names, whatever wrote them: ZeRO 1-3 shards through
DeepSpeed's ``zero_to_fp32``, megatron TP x PP shards through
:func:`segtrain.models.megatron_adapter.megatron_to_hf`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from segtrain.checkpoint.atomic import write_text_atomic
from segtrain.checkpoint.hf import ConversionError, LazyState
from segtrain.config import ModelConfig, from_dict
from segtrain.errors import UserError
from segtrain.parallel.groups import model_parallel_rank

__all__ = [
    "LATEST",
    "MANIFEST",
    "RUN_FILE",
    "TRAINER_STATE",
    "CheckpointError",
    "Start",
    "claim",
    "find_checkpoint",
    "latest_tag",
    "load",
    "plan_start",
    "problem",
    "load_megatron_shards",
    "open_run",
    "run_tokenizer",
    "save",
    "tag_for",
    "write_megatron_shards",
]

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # every file of a step directory with its size: written last, checked on load
RUN_FILE = "run.json"  # OUT/run.json: the run's identity (start time, host, config hash)
METRICS = "metrics.jsonl"
# model fields that change parameter shapes: a checkpoint cannot be loaded into a model that differs in one
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "tie_word_embeddings")  # fmt: skip
CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."  # activation checkpointing's prefix in parameter names
_STEP_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError):
    """A checkpoint or run folder that cannot be used as asked; the message names the folder or file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    match = _STEP_TAG.match(tag)
    return int(match.group(1)) if match else None


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


def _warn(message: str) -> None:
    if _rank() == 0:
        print(f"segtrain: warning: {message}", file=sys.stderr, flush=True)


def latest_tag(save_dir: str | Path) -> str | None:
    """The tag ``latest`` names, if it names a complete checkpoint."""
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (Path(save_dir) / tag / TRAINER_STATE).is_file() else None


def checkpoint_tags(save_dir: str | Path) -> list[str]:
    """The ``step_*`` directories of ``save_dir`` (complete or not, never ``.partial``), oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted((p.name for p in save_dir.iterdir() if p.is_dir() and _STEP_TAG.match(p.name)), key=step_of)


def _write_manifest(tag_dir: Path) -> None:
    files = {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
    write_text_atomic(tag_dir / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def problem(tag_dir: str | Path) -> str | None:
    """Why the checkpoint in ``tag_dir`` cannot be loaded (naming the file), or None when it is complete.

    A checkpoint written before manifests existed is accepted when its ``trainer_state.json`` reads."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    state = tag_dir / TRAINER_STATE
    if not state.is_file():
        return f"{state} is missing (the save did not finish)"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{state} is not valid JSON"
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return f"{manifest} is not a valid manifest"
    for name, size in files.items():
        file = tag_dir / name
        if not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} is {actual:,} bytes, the manifest says {size:,} ({'truncated' if actual < size else 'overwritten'})"
    return None


def find_checkpoint(save_dir: str | Path, tag: str | None = None, *, warn: Callable[[str], None] = _warn) -> str:
    """The checkpoint to load from ``save_dir``: ``tag`` if given, else the one ``latest`` names, else (with a
    warning naming what is wrong) the newest complete one. Raises :class:`CheckpointError` naming the problem."""
    save_dir = Path(save_dir)
    if tag is not None:
        trouble = problem(save_dir / tag)
        if trouble is not None:
            have = checkpoint_tags(save_dir)
            raise CheckpointError(f"checkpoint {tag}: {trouble}" + (f" (checkpoints here: {', '.join(have)})" if have else ""))
        return tag
    pointer = save_dir / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    damaged: list[str] = []  # what is wrong with each checkpoint passed over, newest first
    if named is not None:
        trouble = problem(save_dir / named)
        if trouble is None:
            return named
        damaged.append(f"{LATEST} names {named}, but {trouble}")
    for candidate in reversed(checkpoint_tags(save_dir)):
        if candidate == named:
            continue
        trouble = problem(save_dir / candidate)
        if trouble is None:
            reasons = damaged or [f"{pointer} is missing"]
            warn(f"{'; '.join(reasons)}; using {save_dir / candidate}, the newest complete checkpoint")
            return candidate
        damaged.append(trouble)
    if damaged:
        more = f" (and {len(damaged) - 1} more damaged)" if len(damaged) > 1 else ""
        raise CheckpointError(f"no complete checkpoint in {save_dir}: {damaged[0]}{more}")
    raise CheckpointError(f"no checkpoint in {save_dir}")


def save(
    engine,
    save_dir: str | Path,
    step: int,
    trainer_state: dict,
    keep_last: int = 0,
    *,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Save a checkpoint for ``step`` atomically; keep the newest ``keep_last`` up to ``step`` (0: all). Call on every rank.

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
        _write_manifest(partial)  # last: a step directory with a manifest is complete
        if before_commit is not None:
            before_commit(partial)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        write_text_atomic(save_dir / LATEST, tag + "\n")
        _prune(save_dir, step, keep_last)
    _barrier()
    return final


def _prune(save_dir: Path, step: int, keep_last: int) -> None:
    """After ``step`` is committed: drop unfinished saves and all but the newest ``keep_last`` checkpoints up to ``step``.

    Checkpoints past ``step`` (a run resumed from an earlier one) are left alone; training replaces them."""
    for partial in save_dir.glob("step_*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    if keep_last > 0:
        older = [t for t in checkpoint_tags(save_dir) if step_of(t) < step]
        for tag in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(save_dir / tag, ignore_errors=True)


def load(engine, save_dir: str | Path, tag: str | None = None) -> dict:
    """Load ``tag`` (default: :func:`find_checkpoint`'s choice) into the engine; returns the trainer state."""
    save_dir = Path(save_dir)
    tag = find_checkpoint(save_dir, tag)
    try:
        path, _ = engine.load_checkpoint(str(save_dir), tag=tag)
    except Exception as e:  # a file that passed the size check but does not unpickle, a layout DeepSpeed rejects
        raise CheckpointError(f"{save_dir / tag}: cannot be loaded: {type(e).__name__}: {e}") from e
    if path is None:
        raise CheckpointError(f"{save_dir / tag}: DeepSpeed found no model states to load")
    rng = save_dir / tag / f"rng_rank{_rank():05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((save_dir / tag / TRAINER_STATE).read_text())


# ---- the run directory: who owns it, where a run starts ------------------------------------------


def config_hash(config: dict) -> str:
    """A short hash of a train config without its ``out_dir`` (a copied run folder keeps its identity)."""
    canonical = json.dumps({k: v for k, v in config.items() if k != "out_dir"}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass
class Start:
    """Where a run starts: ``tag`` in ``source`` (None: from scratch); ``notes`` are warnings for the user."""

    source: Path | None = None
    tag: str | None = None
    notes: list[str] = field(default_factory=list)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _compare(config: dict, saved: dict, where: Path) -> list[str]:
    """Stop when the checkpoint's model has other parameter shapes; note the other fields that changed."""
    model, saved_model = config.get("model") or {}, saved.get("model") or {}
    for name in SHAPE_FIELDS:
        if name in saved_model and saved_model[name] != model.get(name):
            raise CheckpointError(
                f"--resume: {where} was trained with model.{name}={saved_model[name]!r}, the config says {model.get(name)!r}; "
                "resume with the same model shape, or start a new out_dir"
            )
    a, b = _flat(config), _flat(saved)
    changed = [k for k in sorted(a.keys() | b.keys()) if k != "out_dir" and a.get(k) != b.get(k)]
    if not changed:
        return []
    shown = ", ".join(f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in changed[:4]) + (", ..." if len(changed) > 4 else "")
    return [f"resuming {where} with a changed config ({shown})"]


def _resume_source(resume: str, save_dir: Path) -> tuple[Path, str | None]:
    """``--resume`` as (checkpoints dir, tag or None for its latest); raises naming the flag."""
    if resume == "auto":
        return save_dir, None
    if resume.isdigit():
        return save_dir, tag_for(int(resume))
    path = Path(resume)
    if _STEP_TAG.match(resume) and not path.exists():
        return save_dir, resume
    if path.is_dir():
        if (path / TRAINER_STATE).is_file() or _STEP_TAG.match(path.name):
            return path.parent, path.name
        if (path / LATEST).is_file() or checkpoint_tags(path):
            return path, None
        if (path / "checkpoints").is_dir():
            return path / "checkpoints", None
        raise CheckpointError(f"--resume: {path} holds no checkpoints (no {LATEST}, no step_* folders)")
    raise CheckpointError(f"--resume: {resume!r} is not 'auto', 'none', a step number or a checkpoint folder (no such folder)")


def _describe_run(out_dir: Path, tags: list[str], config: dict) -> str:
    what = f"checkpoints up to {tags[-1]}" if tags else "a final model"
    run_file = out_dir / RUN_FILE
    try:
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        run = {}
    started = f", started {run['started']}" if run.get("started") else ""
    same = ""
    if run.get("config_hash"):
        same = ", same config" if run["config_hash"] == config_hash(config) else ", another config"
    return f"{what}{started}{same}"


def plan_start(out_dir: str | Path, resume: str, config: dict, *, overwrite: bool = False) -> Start:
    """Decide where a run in ``out_dir`` starts, reading only (call on every rank before anything is written).

    ``resume``: ``none`` (a new run: ``out_dir`` must not hold another run's checkpoints or final model, unless
    ``overwrite``), ``auto`` (this folder's newest complete checkpoint, or a new run when it has none), a
    step number or tag in this folder, or a checkpoint folder (a ``checkpoints`` dir or one ``step_*`` dir).
    """
    out_dir = Path(out_dir)
    save_dir = out_dir / "checkpoints"
    own = checkpoint_tags(save_dir)
    resumable = bool(own) or (save_dir / LATEST).is_file()
    used = resumable or (out_dir / "final").is_dir()
    if resume == "none" or (resume == "auto" and not resumable):
        if used and not overwrite:
            hint = "continue it with --resume auto, " if resumable else ""
            raise CheckpointError(
                f"{out_dir} holds another run ({_describe_run(out_dir, own, config)}): {hint}"
                "choose another out_dir, or pass --overwrite to delete it"
            )
        return Start()
    source, tag = _resume_source(resume, save_dir)
    if source.resolve() != save_dir.resolve() and used and not overwrite:
        raise CheckpointError(
            f"{out_dir} holds another run ({_describe_run(out_dir, own, config)}) and --resume reads {source}: "
            "choose another out_dir, or pass --overwrite to delete it"
        )
    notes: list[str] = []
    tag = find_checkpoint(source, tag, warn=notes.append)
    saved = json.loads((source / tag / TRAINER_STATE).read_text())
    notes += _compare(config, saved.get("config") or {}, source / tag)
    newer = [t for t in checkpoint_tags(source) if source == save_dir and step_of(t) > (step_of(tag) or 0)]
    if newer:
        exist, it = ("exists", "it") if len(newer) == 1 else ("exist", "them")
        notes.append(f"resuming from {tag} although {', '.join(newer)} {exist} here: training replaces {it} when it gets there")
    return Start(source, tag, notes)


def claim(out_dir: str | Path, start: Start, config: dict, *, overwrite: bool = False) -> None:
    """Rank 0, after :func:`plan_start` agreed on every rank: clear the old run (``overwrite``) and record this one."""
    out_dir = Path(out_dir)
    continues_here = start.source is not None and start.source.resolve() == (out_dir / "checkpoints").resolve()
    if overwrite and not continues_here:
        for name in ("checkpoints", "final", "tensorboard"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        for name in (METRICS, RUN_FILE):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if start.tag is None or not (out_dir / RUN_FILE).is_file():
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        run = {"started": started, "host": socket.gethostname(), "pid": os.getpid(), "config_hash": config_hash(config)}
        write_text_atomic(out_dir / RUN_FILE, json.dumps(run, indent=1) + "\n")


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
            module = _load_pt(file)["module"]
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


def _load_pt(file: Path, *, mmap: bool = False) -> dict:
    """One of DeepSpeed's ``.pt`` files (they pickle more than tensors); a damaged one is named, not a traceback."""
    try:
        return torch.load(file, map_location="cpu", mmap=mmap, weights_only=False)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise ConversionError(f"{file}: cannot be read ({type(e).__name__}: {e})") from e


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
        state = LazyState.from_tensors(_load_pt(file, mmap=True)["module"])
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
    module = _load_pt(file, mmap=True).get("module") or {}
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
    if tag is not None or (src / LATEST).is_file() or (checkpoint_tags(src) and not (src / TRAINER_STATE).is_file()):
        src = src / find_checkpoint(src, tag)  # the tag asked for, else `latest`, else the newest complete one
    elif (src / TRAINER_STATE).is_file() and (trouble := problem(src)) is not None:
        raise ConversionError(trouble)
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
