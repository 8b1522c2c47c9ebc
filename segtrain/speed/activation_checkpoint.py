"""Activation checkpointing of the portable model's decoder layers (``portable.activation``); the model stays pure.

Two granularities, chosen per layer:
- **whole layer**: the layer keeps only its input and recomputes everything in backward, the attention forward
  included. Smallest memory: at long T a layer's activations dwarf its input.
- **around attention** (``keep_attention``): the layer recomputes the code before and after its attention slot
  (norms, projections, RoPE, MLP) but keeps what the slot saved for its backward (q, k, v, out and the log-sum-exp
  of flash/flex). The attention forward, the costliest part to redo at long T, runs once; the layer keeps up to
  ``(2 Hq + 2 Hkv) x D`` more values per token than a whole-layer one (measured at the 1B shape and 32K tokens, each
  variant in its own process: 0.35 GiB more peak per layer for 5.3 ms less per step, against 2.3 GiB and 12 ms for
  no checkpointing). Compiled regions are checkpointed inside their graphs, so the backward recomputes only what it
  reads: not the q, k, v projections, nor the MLP's down projection. With ``offload`` the kept tensors wait in host
  memory (:mod:`segtrain.speed.activation_offload`).

``layers: N`` checkpoints only the first N layers; the rest keep all their activations. Only
:mod:`segtrain.speed.portable` applies these, in its one order.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from segtrain.speed.compile import compile_region

__all__ = ["checkpoint_whole", "recomputed_region"]


def checkpoint_whole(fn, *args):
    """``fn(*args)`` keeping only its inputs for backward (non-reentrant, no RNG state: the layers draw none)."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def recomputed_region(region, backend: str | None, keep_matmuls: bool = False):
    """``region`` recomputed in backward; compiled (``backend``) with the checkpoint inside its graph, so the
    partitioner recomputes only what the backward reads. A checkpoint around a compiled call would rerun its whole
    forward, GEMMs whose outputs the backward never reads included (the q, k, v projections, whose backward needs only
    the normed input, and the MLP's down projection). ``keep_matmuls``: the region keeps its matmuls' outputs and
    recomputes only the elementwise code (1.1 GiB more per layer at the 1B shape and 32K tokens). Without gradients
    (evaluation, inference) the plain region runs: nothing to save, nothing to recompute."""
    plain = compile_region(region, backend)
    recompute = compile_region(functools.partial(_checkpoint, region, _keep_matmuls if keep_matmuls else None), backend)

    def run(*args):
        return recompute(*args) if torch.is_grad_enabled() else plain(*args)

    return run


def _checkpoint(region, policy, *args):
    """Non-reentrant checkpoint; with a selective ``policy`` (``torch.utils.checkpoint``'s), what it saves is kept."""
    if policy is None:
        return checkpoint_whole(region, *args)
    context = functools.partial(create_selective_checkpoint_contexts, policy)
    return checkpoint(region, *args, use_reentrant=False, preserve_rng_state=False, context_fn=context)


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE
