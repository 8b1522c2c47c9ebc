"""Activation checkpointing, applied to a built model from outside (the model stays pure).

Two granularities, chosen per layer:
- **whole layer** (``checkpoint_wrapper``): the layer keeps only its input and recomputes everything in backward,
  the attention forward included. Smallest memory: at long T a layer's activations dwarf its input.
- **around attention** (``activation_checkpointing_keep_attention``): the layer recomputes the code before and after
  its attention slot (norms, projections, RoPE, MLP) but keeps what the slot saved for its backward (q, k, v, out and
  the log-sum-exp of flash/flex). The attention forward, the costliest part to redo at long T, runs once; the layer
  keeps up to ``(2 Hq + 2 Hkv) x D`` more values per token than a whole-layer one (measured at the 1B shape and 32K
  tokens, each variant in its own process: 0.35 GiB more peak per layer for 5.3 ms less per step, against 2.3 GiB and
  12 ms for no checkpointing). Compiled regions are checkpointed inside their graphs, so the backward recomputes
  only what it reads: not the q, k, v projections, nor the MLP's down projection. With ``activation_offload`` the
  kept tensors wait in host memory (segtrain/train/activation_offload.py).

``activation_checkpointing_layers`` wraps only the first N layers; the rest keep all their activations.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def apply_activation_checkpointing(
    model: nn.Module, num_layers: int | None = None, keep_attention: int = 0, keep_matmuls: int = 0
) -> nn.Module:
    """Checkpoint the first ``num_layers`` decoder layers (``model.model.layers[i]``; None: all) in place: the first
    ``keep_attention`` of them around their attention slot (of these, the first ``keep_matmuls`` also keep the
    outputs of the output projection and the MLP's gate and up projections), the others whole. Parameter names stay
    loadable. Which layers are chosen does not change the peak: every layer holds its share until its backward."""
    layers = model.model.layers
    wrapped = len(layers) if num_layers is None else min(num_layers, len(layers))
    for i in range(wrapped):
        if i < keep_attention:
            checkpoint_around_attention(layers[i], keep_matmuls=i < keep_matmuls)
        else:
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)
    return model


def checkpoint_around_attention(layer: nn.Module, keep_matmuls: bool = False) -> None:
    """Recompute ``layer.before_attention`` and ``layer.after_attention`` (compiled or not) in backward; the slot
    between them runs once and keeps its saved tensors. The slot's inputs are the recomputed region's outputs, so
    they cost nothing extra: the slot holds them anyway. ``keep_matmuls``: ``after_attention`` keeps its matmuls'
    outputs and recomputes only the elementwise code (1.1 GiB more per layer at the 1B shape and 32K tokens:
    with ``activation_offload`` they wait in host memory). A layer already wrapped stays as it is."""
    if hasattr(layer.before_attention, "recomputed"):
        return
    layer.before_attention = _recomputed(layer.before_attention)
    layer.after_attention = _recomputed(layer.after_attention, _keep_matmuls if keep_matmuls else None)


def _recomputed(region, policy=None):
    """``region`` under checkpoint. A compiled region (``segtrain.train.compile``) is compiled again with the checkpoint
    inside its graph: the partitioner then recomputes in backward only what the backward reads. A checkpoint around
    the compiled call would rerun its whole forward, GEMMs whose outputs the backward never reads included (the q, k, v
    projections, whose backward needs only the normed input, and the MLP's down projection)."""
    inner = getattr(region, "uncompiled", None)
    if inner is not None:
        recompute = torch.compile(functools.partial(_checkpoint, inner, policy), fullgraph=True, backend=region.backend)
    else:
        recompute = functools.partial(_checkpoint, region, policy)

    def run(*args):
        if not torch.is_grad_enabled():  # evaluation and inference: nothing to save, nothing to recompute
            return region(*args)
        return recompute(*args)

    run.recomputed = region  # what it wraps
    return run


def _checkpoint(region, policy, *args):
    """Non-reentrant checkpoint; with a selective ``policy`` (``torch.utils.checkpoint``'s), what it saves is kept."""
    if policy is None:
        return checkpoint(region, *args, use_reentrant=False, preserve_rng_state=False)
    context = functools.partial(create_selective_checkpoint_contexts, policy)
    return checkpoint(region, *args, use_reentrant=False, preserve_rng_state=False, context_fn=context)


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE
