"""The training loop's megatron-core path: TP/PP through megatron-core, DP/ZeRO through DeepSpeed.

What combines (checked by :func:`check`, errors name the field):

- TP (``parallel.tp > 1``, or ``model_impl: megatron``): ZeRO stages 0, 1, 2 and optimizer offload;
  fp32 or bf16. DeepSpeed gets :class:`ModelParallelUnit` so it reduces gradients over the
  data-parallel group only, counts TP-split parameters once per rank in the gradient norm and writes
  one ``mp_rank_XX_model_states.pt`` per model-parallel rank (``XX = tp_rank + tp * pp_rank``).
- PP (``parallel.pp > 1``): megatron-core's 1F1B schedule runs forward and backward of
  ``grad_accum`` micro-batches (torch-style ``backward`` on each stage's output, which DeepSpeed
  0.19 supports only with its ZeRO optimizers; with two forwards before their backwards, as 1F1B
  runs them, only ZeRO-1 accumulates exactly, checked in tests/test_megatron_train.py): ZeRO-1, untied embeddings (a tied
  embedding lives on the first and last stage and would need its own gradient all-reduce). The
  DeepSpeed pipeline engine is not used. DeepSpeed runs with ``managed_gradient_accumulation:
  false``: backward only accumulates, ``engine.step()`` reduces over DP once per step and updates.
- Not combined: ZeRO-3 (parameter partitioning under megatron's TP layers), CP together with TP/PP
  (segtrain's CP runs in the portable model), ``data.reset_position_ids`` (megatron's RoPE uses
  positions ``0..T-1``).

Weights: initialized by megatron-core (its scaled init for output projections), or loaded from a
portable checkpoint (``--init-from``) through :func:`segtrain.models.megatron_adapter.hf_to_megatron`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from segtrain.config import ConfigError
from segtrain.models.megatron_adapter import check_layout, megatron_to_hf, model_parallel_rank
from segtrain.train.distributed import Layout, LayoutError

IGNORE_INDEX = -100


def uses_megatron(cfg) -> bool:
    """``model_impl: megatron``, or TP/PP > 1 (which only the megatron model does)."""
    return getattr(cfg, "model_impl", "portable") == "megatron" or cfg.parallel.tp * cfg.parallel.pp > 1


def check(cfg, layout: Layout) -> None:
    """Stop before any model is built when the megatron path cannot run this config."""
    p = cfg.parallel
    check_layout(cfg.model, p.tp, p.pp)
    if layout.cp > 1:
        raise LayoutError(f"parallel.cp={layout.cp}: context parallelism runs in the portable model; use tp=pp=1 with cp > 1")
    if p.zero_stage == 3:
        raise ConfigError("parallel.zero_stage: ZeRO-3 does not combine with the megatron model (TP/PP); use 0, 1 or 2")
    if p.pp > 1 and p.zero_stage != 1:
        raise ConfigError(
            f"parallel.zero_stage: {p.zero_stage} with parallel.pp={p.pp}; pipeline stages backpropagate through "
            "megatron's 1F1B schedule, whose interleaved backwards DeepSpeed accumulates exactly with ZeRO-1 only "
            "(ZeRO-0 refuses tensor.backward(), ZeRO-2 loses gradients when two forwards precede their backwards): use 1"
        )
    if p.pp > 1 and cfg.model.tie_word_embeddings:
        raise ConfigError(f"model.tie_word_embeddings: tied embeddings with parallel.pp={p.pp} are not supported; untie them")
    if cfg.data.reset_position_ids:
        raise ConfigError("data.reset_position_ids: the megatron model's RoPE uses positions 0..T-1; set it false")


class ModelParallelUnit:
    """The ``mpu`` DeepSpeed asks for groups, answered from megatron-core's ``parallel_state``."""

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        """Unique per (TP, PP) rank: it names DeepSpeed's checkpoint file of this rank."""
        return model_parallel_rank(self.get_tensor_model_parallel_rank(), self.get_pipeline_model_parallel_rank(),
                                   self.get_tensor_model_parallel_world_size())  # fmt: skip

    def get_model_parallel_world_size(self) -> int:
        return self.get_tensor_model_parallel_world_size() * self.get_pipeline_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()


def build_model(cfg, device: torch.device, dtype: torch.dtype, init_from: str | None = None):
    """This rank's megatron stage on ``device``; ``parallel_state`` is initialized here (collective)."""
    from segtrain.models.megatron import build_gpt_model, init_model_parallel

    p = cfg.parallel
    init_model_parallel(p.tp, p.pp, seed=cfg.seed)
    overrides = {"use_cpu_initialization": device.type != "cuda"}
    if cfg.activation_checkpointing:  # megatron's own: recompute every layer in backward
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = build_gpt_model(cfg.model, tp=p.tp, pp=p.pp, dtype=dtype, **overrides).to(device)
    if init_from:
        load_portable_into(model, cfg, init_from)
    return model


def load_portable_into(model, cfg, path: str) -> None:
    """Load a portable checkpoint (directory or ``.safetensors``, HF names) into this rank's megatron shard."""
    from pathlib import Path

    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from segtrain.models.io import WEIGHTS_NAME
    from segtrain.models.megatron_adapter import hf_to_megatron

    file = Path(path) / WEIGHTS_NAME if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"init_from: no {WEIGHTS_NAME} in {path}")
    p = cfg.parallel
    shard = hf_to_megatron(load_file(str(file)), cfg.model, p.tp, p.pp)[
        (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    ]
    missing, unexpected = model.load_state_dict(shard, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"init_from {path}: missing {missing[:3]}, unexpected {unexpected[:3]} in the megatron shard")


def data_parallel_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank()


def micro_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the batch's counted tokens (labels != -100, times ``loss_mask``), as the portable model."""
    labels = batch["labels"]
    weight = (labels != IGNORE_INDEX).float()
    if batch.get("loss_mask") is not None:
        weight = weight * batch["loss_mask"].float()
    positions = torch.arange(labels.shape[1], device=labels.device)[None].expand_as(labels)
    per_token = model(batch["tokens"], positions, None, labels=labels.clamp(min=0))
    return (per_token.float() * weight).sum() / weight.sum().clamp(min=1.0)


class _Stage:
    """What megatron's schedule calls: the DeepSpeed engine (its forward hooks), with the megatron config."""

    def __init__(self, engine, config):
        self.engine, self.config = engine, config
        self.module = engine.module  # megatron looks up model_type etc. through ``.module``

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def set_input_tensor(self, tensor) -> None:
        self.engine.module.set_input_tensor(tensor)


def pipeline_step(engine, batches: list[dict], seq_length: int) -> torch.Tensor:
    """Forward and backward of ``batches`` (the step's micro-batches) through megatron's 1F1B schedule,
    then the optimizer step; returns the sum of the micro-batch losses on every rank (float64)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = engine.module.config

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        labels = batch["labels"]
        weight = (labels != IGNORE_INDEX).float()
        if batch.get("loss_mask") is not None:
            weight = weight * batch["loss_mask"].float()
        positions = torch.arange(labels.shape[1], device=labels.device)[None].expand_as(labels)
        out = model(batch["tokens"], positions, None, labels=labels.clamp(min=0))

        def loss_func(per_token):
            loss = (per_token.float() * weight).sum() / weight.sum().clamp(min=1.0)
            return loss, {"loss": loss.detach().clone()}  # megatron divides `loss` in place by the micro-batch count

        return out, loss_func

    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[_Stage(engine, config)],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=False,
    )
    engine.step()
    device = batches[0]["tokens"].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():
        total += sum(r["loss"].double() for r in results)
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())  # every stage reports the loss
    return total


def deepspeed_overrides(cfg) -> dict:
    """With PP megatron's schedule accumulates the micro-batches (its losses divided by their number) and calls
    ``backward`` itself: DeepSpeed sees one micro-batch of ``micro x grad_accum`` and, unmanaged, only accumulates
    gradients in backward; ``engine.step()`` is the boundary that reduces them over DP and updates."""
    if cfg.parallel.pp == 1:
        return {}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size * cfg.grad_accum,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
    }


def gather_hf_state(engine, cfg) -> dict | None:
    """The whole model under HF names on global rank 0 (None elsewhere); every rank calls it."""
    from megatron.core import parallel_state as ps

    p = cfg.parallel
    mine = None
    if ps.get_data_parallel_rank() == 0:
        key = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
        mine = (key, {k: v.detach().cpu() for k, v in engine.module.state_dict().items() if isinstance(v, torch.Tensor)})
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    shards = dict(g for g in gathered if g is not None)
    return megatron_to_hf(shards, cfg.model, p.tp, p.pp)
