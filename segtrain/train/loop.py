"""The training loop behind ``segtrain train``: DeepSpeed engine, same command on CPU and GPU.

Data order is a pure function of the global sample index (step, micro-step, DP rank), so a resumed
run sees exactly the samples an uninterrupted one would, and DP=2 with micro-batch 1 sees the same
samples per step as DP=1 with micro-batch 2.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from segtrain.checkpoint import run as checkpoint
from segtrain.parallel.groups import make_layout, setup
from segtrain.progress import show_progress
from segtrain.train.config import TrainConfig, deepspeed_config
from segtrain.train.grad_norm import GradNorm
from segtrain.train.library_log import LOGS, LibraryLog, library_log, log_file
from segtrain.train.metrics import MetricsLog, StepTimes
from segtrain.train.recipes import recipe_for
from segtrain.train.signals import StopRequest


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_backend_trains(cfg: TrainConfig, device: torch.device) -> None:
    from segtrain.attention.backends import check_trains
    from segtrain.config import ConfigError

    try:
        check_trains(cfg.model.attention_backend, device)
    except ValueError as e:
        raise ConfigError(f"model.attention_backend: {e}") from None


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_init_from(path: str | Path, cfg: TrainConfig) -> None:
    """``--init-from`` names a model directory whose parameter shapes are the config's (else one error naming the field)."""
    from segtrain.checkpoint import load_config

    path = Path(path)
    if not path.is_dir():
        raise checkpoint.CheckpointError(
            f"--init-from: {path} is not a model directory (config.json + model.safetensors, e.g. OUT/final)"
        )
    config = load_config(path)
    for name in checkpoint.SHAPE_FIELDS:
        if getattr(config, name) != getattr(cfg.model, name):
            raise checkpoint.CheckpointError(
                f"--init-from: {path} has model.{name}={getattr(config, name)!r}, the config says {getattr(cfg.model, name)!r}"
            )


def _collate(samples: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        if key in samples[0]:
            out[key] = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples]).to(device)
    return out


def train(
    cfg: TrainConfig,
    *,
    resume: str = "none",
    overwrite: bool = False,
    init_from: str | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    before_commit: Callable[[Path], None] | None = None,
    stop: StopRequest | None = None,
) -> dict:
    """Run training; returns a summary (final step, losses of this run, ``stopped_by``). Call on every rank.

    ``resume``: ``none``, ``auto``, a step number or a checkpoint folder (:func:`segtrain.checkpoint.run.plan_start`;
    a folder holding another run stops with a :class:`~segtrain.checkpoint.run.CheckpointError` unless
    ``overwrite``). ``stop_at``: stop after that step (with a checkpoint) while the schedule still runs to
    ``cfg.steps``: a long run split into job-sized pieces, each resumed with ``resume="auto"``. SIGTERM,
    SIGINT or SIGUSR1 stop it the same way after the current step (:mod:`segtrain.train.signals`);
    ``stopped_by`` then names the signal; before the first step the signal raises
    :class:`~segtrain.train.signals.StoppedDuringStartup` instead (nothing saved). ``stop``: the request the
    command installed before its own startup work (``starting=True``); made here when None. ``before_commit``:
    called by each save before it is made visible (:func:`segtrain.checkpoint.run.save`). Library messages go to
    ``OUT/logs/`` (:mod:`segtrain.train.library_log`).
    """
    stop = stop if stop is not None else StopRequest(announce=os.environ.get("RANK", "0") == "0", starting=True)
    with stop, library_log() as library:
        return _train(cfg, stop, library, resume=resume, overwrite=overwrite, init_from=init_from, stop_at=stop_at,
                      progress=progress, before_commit=before_commit)  # fmt: skip


def _start_line(start: checkpoint.Start, out_dir: Path, resume: str) -> str:
    """What the run starts from, for the console: the step and checkpoint it resumes, or a new run (and why)."""
    logs = f"library logs: {out_dir / LOGS}"
    if start.tag is None:
        why = f"--resume auto: no checkpoint in {out_dir / 'checkpoints'}, so a " if resume == "auto" else "a "
        return f"{why}new run in {out_dir} ({logs})"
    step = checkpoint.step_of(start.tag)
    into = "" if start.source.resolve() == (out_dir / "checkpoints").resolve() else f" into {out_dir}"
    return f"resuming from step {step if step is not None else start.tag}: {start.source / start.tag}{into} ({logs})"


def _train(cfg: TrainConfig, stop: StopRequest, library: LibraryLog, *, resume: str, overwrite: bool, init_from: str | None,
           stop_at: int | None, progress: bool, before_commit: Callable[[Path], None] | None) -> dict:  # fmt: skip
    from segtrain.train.data import build_train_dataset, check_data

    rank, world, device = setup()
    _check_backend_trains(cfg, device)
    layout = make_layout(world, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp)
    recipe = recipe_for(cfg)  # the model implementation: how to build, step and export it
    recipe.check(cfg, layout)
    if init_from is not None:
        check_init_from(init_from, cfg)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * layout.dp
    check_data(cfg, global_batch)  # the tokenizer against model.vocab_size, data.split against the documents
    out_dir = Path(cfg.out_dir)
    start = _claim(cfg, out_dir, rank, stop, resume=resume, overwrite=overwrite)
    library.open(log_file(out_dir, rank), append=start.tag is not None)
    _seed_all(cfg.seed)  # identical initial weights on every rank
    groups = recipe.parallel_groups(cfg, layout)
    engine = _engine(cfg, recipe, groups, device, init_from)
    state = {"step": 0, "consumed_samples": 0}
    if start.tag is not None:
        state = checkpoint.load(engine, start.source, start.tag)
    # a stop signal may end the data build (minutes on a large corpus): it removes the index files it was writing
    dataset = build_train_dataset(cfg, num_samples=cfg.steps * global_batch, samples_per_step=global_batch)
    with stop.deferred():  # the metrics log drops rows
        log = MetricsLog(out_dir, enabled=rank == 0, start_step=state["step"])
    grad_norm = GradNorm(engine, groups)
    bar = show_progress(total=cfg.steps, initial=state["step"], enabled=rank == 0 and progress, desc="train")
    tokens_per_step = global_batch * cfg.data.seq_length
    losses: list[float] = []
    t_last, step = time.perf_counter(), state["step"]
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    mb = cfg.micro_batch_size
    saved = start.source / start.tag if start.tag is not None else None
    stop.announce = rank == 0
    stop.describe_abort = lambda: f"the last checkpoint is {saved or 'none'}"
    stop.started()
    stopping, times = False, StepTimes()
    while step < last:
        times.lap("host")
        # this DP rank's micro-batches: sample indices depend on (step, micro-step, DP rank) only
        starts = [state["consumed_samples"] + (m * layout.dp + groups.dp_rank) * mb for m in range(cfg.grad_accum)]
        batches = [_collate([dataset[i] for i in range(a, a + mb)], device) for a in starts]
        logs_next = (step + 1) % cfg.log_every == 0 or step + 1 == last  # the same answer on every rank
        measure = grad_norm.measure if logs_next and grad_norm.measures else None
        times.lap("data")
        step_loss, stopping = _reduce(recipe.train_step(engine, batches, before_update=measure), stop, cfg, world, step + 1)
        times.lap("step")
        step += 1
        state = {"step": step, "consumed_samples": state["consumed_samples"] + global_batch}
        losses.append(step_loss)
        now = time.perf_counter()
        tok_s = tokens_per_step / max(now - t_last, 1e-9)
        t_last = now
        lr = engine.get_lr()[0]
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
        bar.update(1)
        if step % cfg.log_every == 0 or step == last or stopping:
            times.lap("host")
            log.log(step, loss=step_loss, lr=lr, tokens_per_s=tok_s, consumed_samples=state["consumed_samples"],
                    grad_norm=grad_norm.value(), **recipe.metrics(), **times.means(), **_memory(device))  # fmt: skip
        if step % cfg.save_every == 0 or step == last or stopping:
            times.lap("host")
            saved = checkpoint.save(engine, out_dir / "checkpoints", step, {**state, "config": cfg.to_dict()},
                                    keep_last=cfg.keep_last, before_commit=before_commit)  # fmt: skip
            times.lap("save")
        if stopping:
            break
    bar.close()
    log.close()
    stopped_by = (stop.name or "a stop signal on another rank") if stopping and step < last else None
    if cfg.export_final and step == cfg.steps:
        export_model(engine, cfg, recipe, groups, out_dir / "final")
    return {"step": step, "losses": losses, "stopped_by": stopped_by, "checkpoint": saved}


def _memory(device: torch.device) -> dict[str, float]:
    """The device's peak allocated memory so far, in GiB (CUDA only; a host-side counter: no sync)."""
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}


def _reduce(step_loss: torch.Tensor, stop: StopRequest, cfg: TrainConfig, world: int, step: int) -> tuple[float, bool]:
    """The step's mean loss over every rank, and whether any rank was asked to stop, in one all-reduce: every rank
    stops after the same step. A loss that is not finite stops the run."""
    reduced = torch.stack([step_loss, step_loss.new_tensor(0.0 if stop.signum is None else 1.0)])
    if dist.is_initialized() and world > 1:
        dist.all_reduce(reduced)
    loss = (reduced[0] / (cfg.grad_accum * world)).item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}")
    return loss, bool(reduced[1].item() > 0)


def _claim(cfg: TrainConfig, out_dir: Path, rank: int, stop: StopRequest, *, resume: str, overwrite: bool) -> checkpoint.Start:
    """Where the run starts (every rank reads it); rank 0 says so and claims ``out_dir``, finishing what it writes."""
    start = checkpoint.plan_start(out_dir, resume, cfg.to_dict(), overwrite=overwrite)  # reads only, on every rank
    _barrier()
    if rank == 0:
        for note in start.notes:
            print(f"segtrain train: warning: {note}", file=sys.stderr, flush=True)
        print(f"segtrain train: {_start_line(start, out_dir, resume)}", file=sys.stderr, flush=True)
        with stop.deferred():  # what it deletes and writes, it finishes
            checkpoint.claim(out_dir, start, cfg.to_dict(), overwrite=overwrite)
            if start.tag is None:
                shutil.rmtree(out_dir / LOGS, ignore_errors=True)  # an earlier run's, of maybe more ranks
    _barrier()
    return start


def _engine(cfg: TrainConfig, recipe, groups, device: torch.device, init_from: str | None):
    """The recipe's model, built and assembled, inside a DeepSpeed engine (optimizer, schedule, ZeRO)."""
    import deepspeed

    dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32
    model = recipe.build(cfg, groups, device, dtype, init_from)
    layout = groups.layout
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, cfg.optim.weight_decay),
        config={**deepspeed_config(cfg, layout.dp * layout.cp), **recipe.deepspeed_overrides(cfg)},
        mpu=groups.deepspeed_mpu(),
        dist_init_required=False,
    )
    return engine


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def export_model(engine, cfg: TrainConfig, recipe, groups, out: Path) -> None:
    """The trained weights in the portable format (config.json + model.safetensors) for generate/convert."""
    from segtrain.checkpoint import save_pretrained

    state = recipe.export_state(engine, cfg, groups)
    if state is not None:
        tokenizer = Path(cfg.data.tokenizer or "")
        tokenizer = tokenizer / "tokenizer.model" if tokenizer.is_dir() else tokenizer  # a tokenizer directory
        tokenizer = tokenizer if cfg.data.tokenizer and tokenizer.is_file() else None
        save_pretrained(None, cfg.model, out, state_dict=state, tokenizer=tokenizer)
    if dist.is_initialized():
        dist.barrier()
