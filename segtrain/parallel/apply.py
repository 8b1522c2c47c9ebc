"""Context parallelism applied to a model from outside (torchtitan style): the model file stays pure.

:func:`apply_context_parallel` swaps every layer's attention for
:func:`~segtrain.parallel.context.context_parallel_segment_attention` over the CP group. Each CP rank
then runs the model on its shard of tokens (:func:`shard_batch`: whole segments, absolute positions
for RoPE). The model's loss on a shard is a mean over that shard's tokens;
:func:`context_parallel_loss` turns it into this rank's share of the mean over the whole sequence.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from segtrain.parallel.context import ExchangeBytes, Ranges, context_parallel_segment_attention, shard_ranges

__all__ = ["ContextParallelRun", "apply_context_parallel", "context_parallel_loss", "shard_batch"]

IGNORE_INDEX = -100


def _decoder(model: nn.Module) -> nn.Module:
    """The module that owns ``segment_attend`` (``LlamaModel``), given it or a wrapper with ``.model``."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "attend_override"):
        raise TypeError(f"{type(model).__name__} has no injectable attention (attend_override): not a segtrain LlamaModel")
    return inner


def apply_context_parallel(
    model: nn.Module,
    group: dist.ProcessGroup | None,
    ranges: Ranges,
    *,
    stats: ExchangeBytes | None = None,
    offload=None,
) -> nn.Module:
    """Run ``model``'s attention context-parallel over ``group``, rank ``r`` of the group holding ``ranges[r]``.

    ``stats`` accumulates the bytes this rank sends; ``offload`` (a
    :class:`~segtrain.parallel.offload.HistoryOffload`) keeps saved history in CPU memory. ``group=None``
    undoes it. Returns the model (changed in place).
    """
    decoder = _decoder(model)
    if group is None:
        decoder.attend_override = None
        return model
    c = decoder.config
    ranges = shard_ranges([b - a for a, b in ranges], c.segment_size)
    if len(ranges) != dist.get_world_size(group):
        raise ValueError(f"{len(ranges)} token ranges for a context-parallel group of {dist.get_world_size(group)} ranks")
    policies = decoder.policies
    backend = "math" if c.attention_backend in ("math", "reference") else "auto"  # auto: FlexAttention on CUDA

    def attend(layer: int):
        return partial(
            context_parallel_segment_attention,
            segment_size=c.segment_size,
            policy=policies[layer],
            group=group,
            ranges=ranges,
            stats=stats,
            offload=offload,
            backend=backend,
        )

    decoder.attend_override = attend
    return model


def shard_batch(batch: dict[str, Tensor], ranges: Ranges, rank: int) -> dict[str, Tensor]:
    """This CP rank's tokens ``[lo, hi)`` of every ``[B, T]`` field, with absolute ``position_ids`` (added if absent)."""
    lo, hi = ranges[rank]
    out = {key: value[:, lo:hi] for key, value in batch.items() if value is not None}
    if "position_ids" not in out:
        tokens = out["tokens"]
        out["position_ids"] = torch.arange(lo, hi, device=tokens.device).expand(tokens.shape[0], -1)
    return out


def context_parallel_loss(
    local_mean: Tensor, labels: Tensor, loss_mask: Tensor | None, group: dist.ProcessGroup | None, scale: float = 1.0
) -> Tensor:
    """``scale x`` (this shard's loss sum) / (tokens counted over the whole sequence in ``group``).

    ``local_mean`` is the model's mean over this shard (:meth:`LlamaForCausalLM.chunked_loss`, which
    divides by the shard's weight clamped at 1). Summed over the group this is ``scale x`` the mean
    over the whole sequence: the CP=1 loss. With gradients averaged over DP x CP, pass ``scale=CP``.
    """
    weight = (labels != IGNORE_INDEX).to(local_mean.dtype)
    if loss_mask is not None:
        weight = weight * loss_mask.to(local_mean.dtype)
    local = weight.sum()
    total = local.detach().clone()
    if group is not None:
        dist.all_reduce(total, group=group)
    return local_mean * local.clamp(min=1.0) * scale / total.clamp(min=1.0)


class ContextParallelRun:
    """What a training loop needs for CP: the split, the model's attention swapped, shards and the loss share.

    ``balance``: the uneven split of :func:`~segtrain.parallel.balance.balanced_ranges` (model FLOPs per
    rank evened out; ``balance_cap``: at most that multiple of the even share of tokens on one rank), else
    equal runs of whole segments. ``offload``: history offload.
    """

    def __init__(
        self,
        model: nn.Module,
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

        config = _decoder(model).config
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

    def loss(self, local_mean: Tensor, shard: dict[str, Tensor]) -> Tensor:
        """This rank's share, scaled by CP because gradients are averaged over DP x CP ranks."""
        return context_parallel_loss(local_mean, shard["labels"], shard.get("loss_mask"), self.group, scale=self.world)

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
