"""The training loop behind ``segtrain train``: DeepSpeed engine, same command on CPU and GPU.

Data order is a pure function of the global sample index (step, micro-step, DP rank), so a resumed
run sees exactly the samples an uninterrupted one would, and DP=2 with micro-batch 1 sees the same
samples per step as DP=1 with micro-batch 2.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from segtrain.train import checkpoint
from segtrain.train import megatron_step as mstep
from segtrain.train.config import TrainConfig, deepspeed_config
from segtrain.train.distributed import build_groups, make_layout, setup
from segtrain.train.metrics import MetricsLog


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _collate(samples: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        if key in samples[0]:
            out[key] = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples]).to(device)
    return out


def build_model(cfg: TrainConfig):
    from segtrain.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(cfg.model)


def train(
    cfg: TrainConfig, *, resume: str = "none", init_from: str | None = None, stop_at: int | None = None, progress: bool = True
) -> dict:
    """Run training; returns a summary (final step, losses of this run). Call on every rank.

    ``stop_at``: stop after that step (with a checkpoint) while the schedule still runs to ``cfg.steps``:
    a long run split into job-sized pieces, each resumed with ``resume="auto"``.
    """
    import deepspeed

    from segtrain.train.data import build_train_dataset

    rank, world, device = setup()
    layout = make_layout(world, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp)
    megatron = mstep.uses_megatron(cfg)  # TP/PP: megatron-core model, DeepSpeed for DP/ZeRO (train/megatron_step.py)
    if megatron:
        mstep.check(cfg, layout)
    groups = build_groups(layout) if layout.cp > 1 else None  # CP: gradients are averaged over DP x CP
    out_dir = Path(cfg.out_dir)
    _seed_all(cfg.seed)  # identical initial weights on every rank
    dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32
    model = mstep.build_model(cfg, device, dtype, init_from) if megatron else build_model(cfg)
    if init_from and not megatron:
        from segtrain.models.io import load_state_dict_into

        load_state_dict_into(model, init_from)
    if cfg.activation_checkpointing and not megatron:
        from segtrain.train.activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    model = model.to(device=device, dtype=dtype)
    cp = None
    if layout.cp > 1:
        from segtrain.parallel.apply import ContextParallelRun

        p = cfg.parallel
        cp = ContextParallelRun(
            model, groups.cp, cfg.data.seq_length, balance=p.cp_balance, balance_cap=p.cp_balance_cap, offload=p.offload_history
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, cfg.optim.weight_decay),
        config={**deepspeed_config(cfg, layout.dp * layout.cp), **(mstep.deepspeed_overrides(cfg) if megatron else {})},
        mpu=mstep.ModelParallelUnit() if megatron else groups.deepspeed_mpu() if groups is not None else None,
        dist_init_required=False,
    )
    state = {"step": 0, "consumed_samples": 0}
    if resume != "none":
        src = out_dir / "checkpoints" if resume == "auto" else Path(resume)
        if resume != "auto" or checkpoint.latest_tag(src) is not None:
            state = checkpoint.load(engine, src)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * layout.dp
    dataset = build_train_dataset(cfg, num_samples=cfg.steps * global_batch)
    log = MetricsLog(out_dir, enabled=rank == 0)
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=rank != 0 or not progress, desc="train", dynamic_ncols=True)
    tokens_per_step = global_batch * cfg.data.seq_length
    losses: list[float] = []
    t_last, step = time.perf_counter(), state["step"]
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < last:
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        if layout.pp > 1:  # megatron's pipeline schedule runs the step's micro-batches
            dp_rank = mstep.data_parallel_rank()
            starts = [state["consumed_samples"] + (m * layout.dp + dp_rank) * cfg.micro_batch_size for m in range(cfg.grad_accum)]
            batches = [_collate([dataset[i] for i in range(a, a + cfg.micro_batch_size)], device) for a in starts]
            step_loss += mstep.pipeline_step(engine, batches, cfg.data.seq_length)
        for micro in range(cfg.grad_accum if layout.pp == 1 else 0):
            dp_rank = mstep.data_parallel_rank() if megatron else rank if groups is None else groups.dp_rank
            first = state["consumed_samples"] + micro * cfg.micro_batch_size * layout.dp + dp_rank * cfg.micro_batch_size
            batch = _collate([dataset[i] for i in range(first, first + cfg.micro_batch_size)], device)
            batch = batch if cp is None else cp.shard(batch)  # this CP rank's tokens, absolute positions
            if megatron:
                loss = mstep.micro_loss(engine, batch)
            else:
                loss = engine(
                    batch["tokens"],
                    labels=batch["labels"],
                    loss_mask=batch.get("loss_mask"),
                    position_ids=batch.get("position_ids"),
                )
            loss = loss if cp is None else cp.loss(loss, batch)  # summed over CP ranks: the whole sequence's mean
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double()
        if dist.is_initialized() and world > 1:
            dist.all_reduce(step_loss)
        step_loss = (step_loss / (cfg.grad_accum * world)).item()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step + 1}")
        step += 1
        state = {"step": step, "consumed_samples": state["consumed_samples"] + global_batch}
        losses.append(step_loss)
        now = time.perf_counter()
        tok_s = tokens_per_step / max(now - t_last, 1e-9)
        t_last = now
        lr = engine.get_lr()[0]
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
        bar.update(1)
        if step % cfg.log_every == 0 or step == last:
            grad_norm = engine.get_global_grad_norm()
            log.log(
                step,
                loss=step_loss,
                lr=lr,
                tokens_per_s=tok_s,
                consumed_samples=state["consumed_samples"],
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                **({} if cp is None else cp.metrics()),
            )
        if step % cfg.save_every == 0 or step == last:
            checkpoint.save(engine, out_dir / "checkpoints", step, {**state, "config": cfg.to_dict()}, keep_last=cfg.keep_last)
    bar.close()
    log.close()
    if cfg.export_final and step == cfg.steps:
        export_model(engine, cfg, out_dir / "final")
    return {"step": step, "losses": losses}


def export_model(engine, cfg: TrainConfig, out: Path) -> None:
    """The trained weights in the portable format (config.json + model.safetensors) for generate/convert."""
    from segtrain.models.io import save_pretrained

    if mstep.uses_megatron(cfg):  # megatron shards -> HF names on rank 0
        state = mstep.gather_hf_state(engine, cfg)
        if dist.get_rank() == 0:
            os.makedirs(out, exist_ok=True)
            save_pretrained(None, cfg.model, out, state_dict=state)
        dist.barrier()
        return
    # ZeRO-3: gather the parameter shards onto rank 0
    state = engine._zero3_consolidated_16bit_state_dict() if cfg.parallel.zero_stage == 3 else engine.module.state_dict()
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        save_pretrained(engine.module, cfg.model, out, state_dict=state)
    if dist.is_initialized():
        dist.barrier()
