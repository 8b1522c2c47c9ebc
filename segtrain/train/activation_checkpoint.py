"""Activation checkpointing, applied to a built model from outside (the model stays pure).

Each wrapped decoder layer keeps only its input for backward and recomputes the rest: at long T the
activations of a layer are far larger than its input. ``activation_checkpointing_layers`` wraps only the first N
layers, trading memory for less recompute.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module, num_layers: int | None = None) -> nn.Module:
    """Wrap the first ``num_layers`` decoder layers (``model.model.layers[i]``; None: all) in place; parameter names
    stay loadable. Which layers are wrapped does not change the peak: every unwrapped layer keeps its activations."""
    layers = model.model.layers
    for i in range(len(layers) if num_layers is None else min(num_layers, len(layers))):
        layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)
    return model
