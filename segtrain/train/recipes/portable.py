"""The portable model (``models/llama.py``): DP/ZeRO 0-3 through DeepSpeed, context parallelism by segments."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from segtrain.config import ConfigError
from segtrain.parallel.groups import ParallelGroups
from segtrain.train.recipes.base import ModelRecipe


def compiles(cfg, device: torch.device) -> bool:
    """``compile: auto`` compiles on CUDA (inductor's CPU kernels need a C++ compiler, and CPU runs are tests and
    demos) unless ZeRO-3 gathers parameters inside the layers; ``true`` and ``false`` are taken as given."""
    if cfg.compile == "auto":
        return device.type == "cuda" and cfg.parallel.zero_stage != 3
    return bool(cfg.compile)


def fuses_loss(cfg, device: torch.device) -> bool:
    """``fused_loss: auto`` is on where ``compile: auto`` is (CUDA, no ZeRO-3: it reads the LM head weight directly)."""
    if cfg.fused_loss == "auto":
        return device.type == "cuda" and cfg.parallel.zero_stage != 3
    return bool(cfg.fused_loss)


class PortableRecipe(ModelRecipe):
    name = "portable"
    fused_loss = False

    def check(self, cfg, layout) -> None:
        if cfg.fp8 is not None:
            raise ConfigError("fp8: FP8 GEMMs run in the megatron model (model_impl: megatron, Transformer Engine's layers)")

    def build(self, cfg, groups: ParallelGroups, device: torch.device, dtype: torch.dtype, init_from: str | None) -> nn.Module:
        from segtrain.models.llama import LlamaForCausalLM

        self.fused_loss = fuses_loss(cfg, device)
        model = LlamaForCausalLM(cfg.model)
        if init_from:
            from segtrain.checkpoint import load_state_dict_into

            load_state_dict_into(model, init_from)
        if compiles(cfg, device):
            from segtrain.train.compile import compile_model

            compile_model(model)
        if cfg.activation_checkpointing:
            from segtrain.train.activation_checkpoint import apply_activation_checkpointing

            apply_activation_checkpointing(
                model,
                cfg.activation_checkpointing_layers,
                cfg.activation_checkpointing_keep_attention or 0,
                cfg.activation_checkpointing_keep_matmuls or 0,
            )
        if cfg.activation_offload:
            from segtrain.train.activation_offload import apply_activation_offload

            apply_activation_offload(model, ahead=2 if cfg.activation_checkpointing_keep_matmuls else 1)
        model = model.to(device=device, dtype=dtype)
        self.apply_context_parallel(model, cfg, groups)
        return model

    def per_token_loss(self, engine, batch: dict[str, Tensor]) -> Tensor:
        return engine(batch["tokens"], labels=batch["labels"], position_ids=batch.get("position_ids"), reduction="none")

    def micro_loss(self, engine, batch: dict[str, Tensor]) -> Tensor:
        """With ``fused_loss`` the weights go into the forward, which computes the loss's gradients there."""
        if not self.fused_loss:
            return super().micro_loss(engine, batch)
        shard = self.shard(batch)
        return engine(shard["tokens"], labels=shard["labels"], position_ids=shard.get("position_ids"),
                      loss_weights=self.shard_weights(shard))  # fmt: skip

    def export_state(self, engine, cfg, groups: ParallelGroups) -> dict | None:
        from segtrain.compat.deepspeed import consolidated_state_dict

        state = consolidated_state_dict(engine)  # ZeRO-3: the parameter shards gathered onto rank 0
        return state if not dist.is_initialized() or dist.get_rank() == 0 else None
