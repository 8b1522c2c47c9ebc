"""Weighted cross-entropy whose gradients are computed in the forward, chunk by chunk.

Why: the chunked loss of :meth:`segtrain.models.llama.LlamaForCausalLM.per_token_loss` checkpoints each
chunk, so the backward recomputes the final norm and the LM head GEMM (the largest GEMM of the step) to
get the logits back. The training loss is a weighted sum of per-token cross-entropies whose weights are
already known in the forward, so the gradient of each chunk's share can be computed right there, while
its logits exist: softmax minus one-hot, times the weight. Nothing is recomputed, and no ``[T, V]``
tensor ever exists (at most one chunk's ``[chunk, V]`` logits and their gradient).

The cost: the gradients with respect to ``hidden``, the norm weight and the LM head weight are held
from the forward until the backward. These are the same tensors the backward would create anyway,
only created earlier.

Contract: the result is a scalar whose backward must run once, with a scalar ``grad_output`` (e.g. a
loss scale); the stored gradients are scaled in place and released. It computes the gradients even
when none is needed: for a loss without gradients (evaluation) use the model's ``chunked_loss``.

Numerics are those of :class:`segtrain.models.llama.RMSNorm`, ``LlamaForCausalLM.logits`` and
``_chunk_ce``: RMSNorm in float32 (float64 stays float64), logits GEMM in the hidden dtype, cross-entropy
in float32. The RMSNorm backward is written out in that same float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segtrain.loss import IGNORE_INDEX

__all__ = ["chunk_loss_and_grads", "weighted_cross_entropy"]


def chunk_loss_and_grads(
    h: Tensor, norm_weight: Tensor, head_weight: Tensor, labels: Tensor, weights: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss and gradients of one chunk: ``sum_i weights[i] * ce[i]`` over ``h [n, H]``, ``labels [n]``, ``weights [n]``.

    Returns ``(loss_sum, dh, dnorm, dlogits, y)``: the weighted loss (float32, float64 for float64
    ``h``), its gradient with respect to ``h`` (``h``'s dtype) and ``norm_weight`` (float32 / float64,
    summed over the chunk), the gradient of the logits GEMM's output (in that GEMM's dtype) and the
    normed input ``y`` of the GEMM, so the caller accumulates ``dW += dlogits.T @ y``. That product
    needs an in-place ``addmm_`` into one buffer, so it stays outside this pure, compilable function.
    """
    dtype = h.dtype
    acc = torch.promote_types(dtype, torch.float32)
    # Forward, as RMSNorm.forward and LlamaForCausalLM.logits.
    x = h.to(acc)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xn = (x * rstd).to(dtype)
    y = norm_weight * xn
    logits_lp = y @ head_weight.T
    logits = logits_lp.to(acc)
    # Cross-entropy with ignored positions masked by arithmetic, not control flow (traceable).
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0).unsqueeze(-1)
    w = torch.where(valid, weights.to(acc), 0.0)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    ce = (lse - logits.gather(-1, target)).squeeze(-1)
    loss_sum = (w * torch.where(valid, ce, 0.0)).sum()
    # d(loss_sum)/d(logits) = w * (softmax - one_hot(target)).
    dlogits = (torch.exp(logits - lse) * w.unsqueeze(-1)).scatter_add(-1, target, -w.unsqueeze(-1))
    dlogits = dlogits.to(logits_lp.dtype)
    dy = (dlogits @ head_weight).to(acc)
    dnorm = (dy * xn.to(acc)).sum(0)
    # RMSNorm backward: xn = x * rstd, rstd = (mean(x^2) + eps)^-1/2  =>  dx = rstd * (dxn - xn * mean(dxn * xn)).
    dxn = dy * norm_weight.to(acc)
    xn_acc = x * rstd
    dh = rstd * (dxn - xn_acc * (dxn * xn_acc).mean(-1, keepdim=True))
    return loss_sum, dh.to(dtype), dnorm, dlogits, y


class _WeightedCrossEntropy(torch.autograd.Function):
    """Forward: loss and all three gradients, chunk by chunk. Backward: those gradients times ``grad_output``."""

    @staticmethod
    def forward(ctx, hidden, norm_weight, head_weight, labels, weights, eps, chunk_size, chunk_fn):
        batch, seq_len, dim = hidden.shape
        acc = torch.promote_types(hidden.dtype, torch.float32)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        dh = torch.empty_like(hidden)
        dnorm = torch.zeros(dim, dtype=acc, device=hidden.device)
        dw = torch.zeros_like(head_weight)
        for a in range(0, seq_len, chunk_size):
            h = hidden[:, a : a + chunk_size]
            n = h.shape[1]
            part, dh_c, dnorm_c, dlogits, y = chunk_fn(
                h.reshape(batch * n, dim),
                norm_weight,
                head_weight,
                labels[:, a : a + chunk_size].reshape(-1),
                weights[:, a : a + chunk_size].reshape(-1),
                eps,
            )
            loss += part
            dh[:, a : a + chunk_size] = dh_c.view(batch, n, dim)
            dnorm += dnorm_c
            dw.addmm_(dlogits.T, y)
        ctx.grads = (dh, dnorm.to(norm_weight.dtype), dw)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("weighted_cross_entropy: backward may run only once (its gradients are released)")
        grads, ctx.grads = ctx.grads, None
        dh, dnorm, dw = (g.mul_(grad_output.to(g.dtype)) for g in grads)
        return dh, dnorm, dw, None, None, None, None, None


def weighted_cross_entropy(
    hidden: Tensor,
    norm_weight: Tensor,
    head_weight: Tensor,
    labels: Tensor,
    weights: Tensor,
    *,
    eps: float,
    chunk_size: int,
    chunk_fn=None,
) -> Tensor:
    """``sum_t weights[t] * ce[t]`` over pre-norm ``hidden [B, T, H]``, with gradients computed in the forward.

    Args:
        hidden: ``[B, T, H]`` pre-norm hidden states (bf16, fp16, fp32 or fp64).
        norm_weight: ``[H]`` final RMSNorm weight.
        head_weight: ``[V, H]`` LM head weight (may be the tied embedding: autograd sums the two grads).
        labels: ``[B, T]`` targets; ``IGNORE_INDEX`` positions contribute nothing.
        weights: ``[B, T]`` per-token loss weights, already normalised (no gradient flows to them).
        eps: RMSNorm epsilon.
        chunk_size: positions of ``T`` per chunk; one chunk's ``[B * chunk_size, V]`` logits exist at a time.
        chunk_fn: replaces :func:`chunk_loss_and_grads` (same signature), e.g.
            ``torch.compile(chunk_loss_and_grads, fullgraph=True)``.

    Returns:
        The scalar loss, float32 (float64 for float64 ``hidden``). Its backward must run once.
    """
    if labels.shape != hidden.shape[:2] or weights.shape != labels.shape:
        shapes = f"labels {tuple(labels.shape)} and weights {tuple(weights.shape)}"
        raise ValueError(f"{shapes} must be [B, T] = {tuple(hidden.shape[:2])}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _WeightedCrossEntropy.apply(
        hidden, norm_weight, head_weight, labels, weights.detach(), eps, chunk_size, chunk_fn or chunk_loss_and_grads
    )
