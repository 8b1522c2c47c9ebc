"""Context parallelism applied to a model from outside (torchtitan style): the model file stays pure.

:func:`apply_context_parallel` fills every layer's attention slot with
:func:`~segtrain.parallel.context.context_parallel_segment_attention` over the CP group. Each CP rank
then runs the model on its shard of tokens (:func:`shard_batch`: whole segments, absolute positions
for RoPE), and :func:`segtrain.loss.shard_share` turns the shard's per-token loss into this rank's
share of the mean over the whole sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from segtrain.attention import SegmentAttention, attention_slots, fill_slots, restore_slots
from segtrain.loss import loss_weights, shard_share
from segtrain.parallel.context import ExchangeBytes, Ranges, context_parallel_segment_attention, shard_ranges

__all__ = ["ContextParallelAttention", "ContextParallelRun", "apply_context_parallel", "shard_batch"]


class ContextParallelAttention(nn.Module):
    """What fills a layer's attention slot under CP: :func:`context_parallel_segment_attention` over ``group``."""

    def __init__(self, slot: SegmentAttention, group, ranges: Ranges, stats: ExchangeBytes | None, offload):
        super().__init__()
        if not slot.carry_grad:
            raise ValueError("model.carry_grad: false is not supported with context parallelism; use parallel.cp=1")
        self.segment_size, self.policy, self.backend, self.scale = slot.segment_size, slot.policy, slot.backend, slot.scale
        self.group, self.ranges, self.stats, self.offload = group, ranges, stats, offload

    def forward(self, q: Tensor, k: Tensor, v: Tensor, documents=None) -> Tensor:
        return context_parallel_segment_attention(
            q, k, v, segment_size=self.segment_size, policy=self.policy, scale=self.scale, group=self.group,
            ranges=self.ranges, stats=self.stats, offload=self.offload, backend=self.backend, documents=documents,
        )  # fmt: skip


def apply_context_parallel(
    model: nn.Module,
    group: dist.ProcessGroup | None,
    ranges: Ranges,
    *,
    stats: ExchangeBytes | None = None,
    offload=None,
) -> nn.Module:
    """Fill ``model``'s attention slots with context-parallel attention over ``group``, rank ``r`` of the group holding
    ``ranges[r]``.

    ``stats`` accumulates the bytes this rank sends; ``offload`` (a
    :class:`~segtrain.parallel.offload.HistoryOffload`) keeps saved history in CPU memory. ``group=None``
    undoes it. Returns the model (changed in place).
    """
    if group is None:
        return restore_slots(model)
    slots = attention_slots(model)
    ranges = shard_ranges([b - a for a, b in ranges], slots[0][1].segment_size)
    if len(ranges) != dist.get_world_size(group):
        raise ValueError(f"{len(ranges)} token ranges for a context-parallel group of {dist.get_world_size(group)} ranks")
    return fill_slots(model, lambda slot: ContextParallelAttention(slot, group, ranges, stats, offload))


def shard_batch(batch: dict[str, Tensor], ranges: Ranges, rank: int) -> dict[str, Tensor]:
    """This CP rank's tokens ``[lo, hi)`` of every ``[B, T]`` field, with absolute ``position_ids`` (added if absent)."""
    lo, hi = ranges[rank]
    out = {key: value[:, lo:hi] for key, value in batch.items() if value is not None}
    if "position_ids" not in out:
        tokens = out["tokens"]
        out["position_ids"] = torch.arange(lo, hi, device=tokens.device).expand(tokens.shape[0], -1)
    return out


class ContextParallelRun:
    """What a training loop needs for CP: the split (from the model ``config``), the model's attention slots filled,
    shards and the loss share.

    ``balance``: the uneven split of :func:`~segtrain.parallel.balance.balanced_ranges` (model FLOPs per
    rank evened out; ``balance_cap``: at most that multiple of the even share of tokens on one rank), else
    equal runs of whole segments. ``offload``: history offload.
    """

    def __init__(
        self,
        model: nn.Module,
        config,
        group: dist.ProcessGroup,
        seq_len: int,
        *,
        balance: bool = True,
        balance_cap: float | None = None,
        offload: bool = False,
    ):
        from segtrain.parallel.balance import balanced_ranges
        from segtrain.parallel.context import context_parallel_ranges
        from segtrain.parallel.offload import HistoryOffload

        self.group, self.world, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        if balance:
            self.ranges = balanced_ranges(config, seq_len, self.world, token_cap=balance_cap)
        else:
            self.ranges = context_parallel_ranges(seq_len, config.segment_size, self.world)
        self.stats = ExchangeBytes()
        self.offload = HistoryOffload() if offload else None
        apply_context_parallel(model, group, self.ranges, stats=self.stats, offload=self.offload)

    def shard(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return shard_batch(batch, self.ranges, self.rank)

    def loss(self, per_token: Tensor, shard: dict[str, Tensor]) -> Tensor:
        """This rank's share of the sequence's mean loss, scaled by CP because gradients are averaged over DP x CP ranks."""
        return shard_share(per_token, shard["labels"], shard.get("loss_mask"), self.group, scale=self.world)

    def weights(self, shard: dict[str, Tensor]) -> Tensor:
        """Per-position weights whose sum against the per-token loss is :meth:`loss` (for a loss fused in the forward)."""
        return loss_weights(shard["labels"], shard.get("loss_mask"), self.group, scale=self.world)

    def metrics(self) -> dict[str, int]:
        """Bytes so far, summed over the CP group (call on every CP rank): sent between ranks, history offloaded and
        prefetched in time."""
        values = [self.stats.carry + self.stats.history + self.stats.carry_grad]
        if self.offload is not None:
            s = self.offload.settle()
            values += [s.offloaded, s.hidden]
        total = torch.tensor(values, dtype=torch.float64, device=_device_of(self.group))
        dist.all_reduce(total, group=self.group)
        names = ["cp_bytes_sent", "history_offloaded_bytes", "history_hidden_bytes"]
        return {name: int(v) for name, v in zip(names, total.tolist())}


def _device_of(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
