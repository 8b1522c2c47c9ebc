"""What every recipe shares: the step over micro-batches (forward, loss, backward, optimizer) and CP."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from segtrain.config import ConfigError
from segtrain.loss import loss_weights, mean_loss
from segtrain.parallel.groups import Layout, ParallelGroups, build_groups


def positive(where: str, value) -> None:
    """A config value that must be a positive integer (errors name the field)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: must be a positive integer, got {value!r}")


def check_layers(where: str, layers: int | None, checkpointing: bool, cfg) -> int:
    """``<section>.activation.layers``: positive, at most a pipeline stage's layers, only with checkpointing; returns how
    many layers of a stage are checkpointed."""
    per_stage = cfg.model.num_layers // cfg.parallel.pp
    if layers is None:
        return per_stage
    positive(f"{where}.layers", layers)
    if not checkpointing:
        raise ConfigError(f"{where}.layers: set {where}.checkpointing: true as well")
    if layers > per_stage:
        raise ConfigError(f"{where}.layers: {layers} is more than the {per_stage} decoder layers of a pipeline stage")
    return layers


class ModelRecipe:
    """One model implementation as the training loop sees it. Subclasses fill in ``build`` and ``per_token_loss``.

    ``cp`` is the :class:`~segtrain.parallel.apply.ContextParallelRun` when ``parallel.cp > 1``: the step
    runs each micro-batch on this rank's shard of the sequence and takes its share of the loss.
    """

    name = "model"
    cp = None

    def check(self, cfg, layout: Layout) -> None:
        """Stop before anything is built when this implementation cannot run ``cfg`` (errors name the field)."""

    def parallel_groups(self, cfg, layout: Layout) -> ParallelGroups:
        """This rank's process groups (collective)."""
        return build_groups(layout)

    def build(self, cfg, groups: ParallelGroups, device: torch.device, dtype: torch.dtype, init_from: str | None) -> nn.Module:
        raise NotImplementedError

    def apply_context_parallel(self, model: nn.Module, cfg, groups: ParallelGroups) -> None:
        """Fill the model's attention slots with CP attention over ``groups.cp`` (when ``parallel.cp > 1``)."""
        if groups.layout.cp == 1:
            return
        from segtrain.parallel.apply import ContextParallelRun

        p = cfg.parallel
        self.cp = ContextParallelRun(model, cfg.model, groups.cp, cfg.data.seq_length, balance=p.cp_balance,
                                     balance_cap=p.cp_balance_cap, offload=p.offload_history)  # fmt: skip

    def deepspeed_overrides(self, cfg) -> dict:
        return {}

    def per_token_loss(self, engine, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy of every position of ``batch``, ``[B, T]``."""
        raise NotImplementedError

    def shard(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's part of a micro-batch: under CP its tokens with their absolute positions, else all of it."""
        return batch if self.cp is None else self.cp.shard(batch)

    def shard_loss(self, per_token: Tensor, shard: dict[str, Tensor]) -> Tensor:
        """The loss a micro-batch backpropagates from this rank's per-token loss: the sequence mean, or under CP this
        rank's share of it times the CP size (the shares sum to the mean; gradients are averaged over DP x CP)."""
        if self.cp is not None:
            return self.cp.loss(per_token, shard)
        return mean_loss(per_token, shard["labels"], shard.get("loss_mask"))

    def shard_weights(self, shard: dict[str, Tensor]) -> Tensor:
        """Per-position weights whose sum against the per-token loss is :meth:`shard_loss` (for a fused loss)."""
        if self.cp is not None:
            return self.cp.weights(shard)
        return loss_weights(shard["labels"], shard.get("loss_mask"))

    def micro_loss(self, engine, batch: dict[str, Tensor]) -> Tensor:
        """The loss one micro-batch backpropagates (:meth:`shard_loss` of this rank's shard)."""
        shard = self.shard(batch)
        return self.shard_loss(self.per_token_loss(engine, shard), shard)

    def train_step(self, engine, batches: list[dict[str, Tensor]], before_update: Callable[[], None] | None = None) -> Tensor:
        """Forward and backward of the step's micro-batches, then the optimizer step (DeepSpeed steps at the
        accumulation boundary); returns the sum of the micro-batch losses (float64, on the device).
        ``before_update``: called once the gradients are complete (reduced over DP x CP), before clipping and update."""
        total = torch.zeros((), dtype=torch.float64, device=batches[0]["tokens"].device)
        for i, batch in enumerate(batches):
            loss = self.micro_loss(engine, batch)
            engine.backward(loss)  # the last one reduces the gradients (DeepSpeed's accumulation boundary)
            if before_update is not None and i == len(batches) - 1:
                before_update()
            engine.step()
            total += loss.detach().double()
        return total

    def metrics(self) -> dict:
        """Extra values for the metrics log (call on every rank: CP sums over its group)."""
        return {} if self.cp is None else self.cp.metrics()

    def export_state(self, engine, cfg, groups: ParallelGroups) -> dict | None:
        """The trained weights under HF names on global rank 0, None elsewhere; every rank calls it."""
        raise NotImplementedError
