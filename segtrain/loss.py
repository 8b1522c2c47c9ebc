"""The training loss, one definition for every model and every parallel layout.

Models return the cross-entropy of each position (``[B, T]``; both models compute it chunk by chunk,
so whole-sequence logits never exist). Which positions count, and how the mean is taken, is decided
here only: a position counts where its label is not :data:`IGNORE_INDEX`, weighted by ``loss_mask``;
the loss is the weighted mean over the sequence. Under context parallelism each rank holds a shard
of the sequence and contributes its share of that same mean (:func:`shard_share`), so the sum over
the CP group is the CP=1 loss. A mean per sample (``data.loss_average: sample``) is the same weighted mean over
weights the data scales to sum to 1 per sample (``segtrain.train.data.PerSampleMean``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["IGNORE_INDEX", "loss_weights", "mean_loss", "shard_share", "token_weights"]

IGNORE_INDEX = -100


def token_weights(labels: Tensor, loss_mask: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B, T]``: 1 where ``labels`` counts (not ``IGNORE_INDEX``), times ``loss_mask`` where given."""
    weight = (labels != IGNORE_INDEX).to(dtype)
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must match labels {tuple(labels.shape)}")
        weight = weight * loss_mask.to(dtype)
    return weight


def _accumulate(per_token: Tensor) -> Tensor:
    """In float32 at least (float64 stays float64)."""
    return per_token.to(torch.promote_types(per_token.dtype, torch.float32))


def mean_loss(per_token: Tensor, labels: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """The weighted mean of ``per_token [B, T]`` over the counted positions (0 when none counts)."""
    per_token = _accumulate(per_token)
    weight = token_weights(labels, loss_mask, per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


def shard_share(
    per_token: Tensor, labels: Tensor, loss_mask: Tensor | None, group: dist.ProcessGroup | None, scale: float = 1.0
) -> Tensor:
    """``scale x`` (this shard's weighted loss sum) / (positions counted over the whole sequence in ``group``).

    Summed over the group this is ``scale x`` the mean over the whole sequence: the CP=1 loss. With
    gradients averaged over DP x CP ranks, pass ``scale=CP``.
    """
    per_token = _accumulate(per_token)
    weight = token_weights(labels, loss_mask, per_token.dtype)
    total = weight.sum().detach().clone()
    if group is not None:
        dist.all_reduce(total, group=group)
    return (per_token * weight).sum() * scale / total.clamp(min=1.0)


def loss_weights(
    labels: Tensor, loss_mask: Tensor | None = None, group: dist.ProcessGroup | None = None, scale: float = 1.0
) -> Tensor:
    """``[B, T]`` weights ``w`` with ``sum(per_token x w)`` = :func:`shard_share` (:func:`mean_loss` without a group):
    for a loss that takes its weights in the forward (``LlamaForCausalLM(..., loss_weights=w)``). Float64, a few bytes
    per token, so that a float64 model's loss is exact; the loss rounds them to its own precision."""
    weight = token_weights(labels, loss_mask, torch.float64)
    total = weight.sum()
    if group is not None:
        dist.all_reduce(total, group=group)
    return weight * (scale / total.clamp(min=1.0))
