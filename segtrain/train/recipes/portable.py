"""The portable model (``models/llama.py``): DP/ZeRO 0-3 through DeepSpeed, context parallelism by segments."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from segtrain.config import ConfigError
from segtrain.parallel.groups import ParallelGroups
from segtrain.speed.portable import ActivationOptions
from segtrain.train.recipes.base import ModelRecipe, check_layers, positive


@dataclass
class PortableConfig:
    """The portable model's options (the ``portable:`` section of a train config)."""

    # torch.compile around each attention slot and of the loss chunk (segtrain/speed/compile.py): "auto" (on CUDA,
    # without ZeRO-3), true or false
    compile: bool | str = "auto"
    # the loss's gradients computed in its forward, chunk by chunk (segtrain/models/fused_loss.py): the backward does
    # not recompute the LM head. "auto" (on CUDA, without ZeRO-3), true or false
    fused_loss: bool | str = "auto"
    activation: ActivationOptions = field(default_factory=ActivationOptions)  # checkpointing and offload

    def check(self, cfg) -> None:
        """Stop on a bad value before anything is built (errors name the field)."""
        zero3 = cfg.parallel.zero_stage == 3
        for name, why in (("compile", "cannot trace ZeRO-3's parameter gathering hooks"),
                          ("fused_loss", "reads the LM head outside its module, where ZeRO-3 has not gathered it")):  # fmt: skip
            value = getattr(self, name)
            if value not in ("auto", True, False):
                raise ConfigError(f"portable.{name}: must be auto, true or false, got {value!r}")
            if value is True and zero3:
                raise ConfigError(f"portable.{name}: true {why}; use auto with parallel.zero_stage 3")
        _check_activation(self.activation, cfg)


def _check_activation(a: ActivationOptions, cfg) -> None:
    where = "portable.activation"
    checkpointed = check_layers(where, a.layers, a.checkpointing, cfg)
    if a.keep_attention:
        positive(f"{where}.keep_attention", a.keep_attention)
        if not a.checkpointing:
            raise ConfigError(f"{where}.keep_attention: set {where}.checkpointing: true as well")
        if a.keep_attention > checkpointed:
            raise ConfigError(
                f"{where}.keep_attention: {a.keep_attention} is more than the {checkpointed} checkpointed layers"
                + (f" ({where}.layers)" if a.layers is not None else " of a pipeline stage")
            )
    if a.keep_matmuls:
        positive(f"{where}.keep_matmuls", a.keep_matmuls)
        if a.keep_matmuls > a.keep_attention:
            raise ConfigError(
                f"{where}.keep_matmuls: {a.keep_matmuls} is more than the {a.keep_attention} layers that keep their "
                f"attention ({where}.keep_attention)"
            )
    if a.offload and not a.checkpointing:
        raise ConfigError(f"{where}.offload: offloads what checkpointed layers keep; set {where}.checkpointing: true as well")


def compiles(cfg, device: torch.device) -> bool:
    """``compile: auto`` compiles on CUDA (inductor's CPU kernels need a C++ compiler, and CPU runs are tests and
    demos) unless ZeRO-3 gathers parameters inside the layers; ``true`` and ``false`` are taken as given."""
    if cfg.portable.compile == "auto":
        return device.type == "cuda" and cfg.parallel.zero_stage != 3
    return bool(cfg.portable.compile)


def fuses_loss(cfg, device: torch.device) -> bool:
    """``fused_loss: auto`` is on where ``compile: auto`` is (CUDA, no ZeRO-3: it reads the LM head weight directly)."""
    if cfg.portable.fused_loss == "auto":
        return device.type == "cuda" and cfg.parallel.zero_stage != 3
    return bool(cfg.portable.fused_loss)


def build_model(cfg, device: torch.device, dtype: torch.dtype, init_from: str | None = None) -> nn.Module:
    """The portable model as training runs it on ``device``, before context parallelism: built, loaded from
    ``init_from``, compiled and wrapped as ``cfg.portable`` resolves there. ``tools/bench_loop.py``'s baseline
    assembles its model here too, so the bench and the loop time one model."""
    from segtrain.models.llama import LlamaForCausalLM
    from segtrain.speed.portable import parallelize_portable

    model = LlamaForCausalLM(cfg.model)
    if init_from:
        from segtrain.checkpoint import load_state_dict_into

        load_state_dict_into(model, init_from)
    parallelize_portable(model, compile=compiles(cfg, device), activation=cfg.portable.activation)
    return model.to(device=device, dtype=dtype)


class PortableRecipe(ModelRecipe):
    name = "portable"
    fused_loss = False

    def build(self, cfg, groups: ParallelGroups, device: torch.device, dtype: torch.dtype, init_from: str | None) -> nn.Module:
        self.fused_loss = fuses_loss(cfg, device)
        model = build_model(cfg, device, dtype, init_from)
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
