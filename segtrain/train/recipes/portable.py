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


class PortableRecipe(ModelRecipe):
    name = "portable"

    def check(self, cfg, layout) -> None:
        if cfg.fp8 is not None:
            raise ConfigError("fp8: FP8 GEMMs run in the megatron model (model_impl: megatron, Transformer Engine's layers)")

    def build(self, cfg, groups: ParallelGroups, device: torch.device, dtype: torch.dtype, init_from: str | None) -> nn.Module:
        from segtrain.models.llama import LlamaForCausalLM

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
                model, cfg.activation_checkpointing_layers, cfg.activation_checkpointing_keep_attention or 0
            )
        model = model.to(device=device, dtype=dtype)
        self.apply_context_parallel(model, cfg, groups)
        return model

    def per_token_loss(self, engine, batch: dict[str, Tensor]) -> Tensor:
        return engine(batch["tokens"], labels=batch["labels"], position_ids=batch.get("position_ids"), reduction="none")

    def export_state(self, engine, cfg, groups: ParallelGroups) -> dict | None:
        from segtrain.compat.deepspeed import consolidated_state_dict

        state = consolidated_state_dict(engine)  # ZeRO-3: the parameter shards gathered onto rank 0
        return state if not dist.is_initialized() or dist.get_rank() == 0 else None
