"""Checkpoints that survive a crash mid-save, on top of DeepSpeed's own save/load.

DeepSpeed writes model, optimizer (ZeRO shards included) and scheduler state into ``DIR/<tag>/``.
We let it write ``DIR/<tag>.partial/``, then rank 0 renames that to ``DIR/<tag>/`` and replaces
``DIR/latest`` (a one-line file naming the tag) by rename too. A crash at any point leaves the
previous ``latest`` naming a complete checkpoint. Beside DeepSpeed's files, each checkpoint holds
``trainer_state.json`` (step, consumed samples, config) and each rank's RNG states.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
_STEP_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    return tag if (Path(save_dir) / tag / "trainer_state.json").is_file() else None


def save(engine, save_dir: str | Path, step: int, trainer_state: dict, keep_last: int = 0) -> Path:
    """Save a checkpoint for ``step`` atomically; keep the newest ``keep_last`` (0: all). Call on every rank."""
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
        _write_atomic(partial / "trainer_state.json", json.dumps({**trainer_state, "step": step, "time": time.time()}, indent=1))
        pause_step, _, pause_s = os.environ.get("SEGTRAIN_TEST_PAUSE_IN_SAVE", "").partition(":")
        if pause_step and int(pause_step) == step:  # "STEP:SECONDS": tests kill the process mid-save here
            (save_dir / "SAVING").touch()
            time.sleep(float(pause_s))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(save_dir / LATEST, tag + "\n")
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
    if tag is None or not (save_dir / tag / "trainer_state.json").is_file():
        raise FileNotFoundError(f"no complete checkpoint {tag or LATEST!r} in {save_dir}")
    path, _ = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {save_dir / tag}")
    rng = save_dir / tag / f"rng_rank{_rank():05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((save_dir / tag / "trainer_state.json").read_text())
