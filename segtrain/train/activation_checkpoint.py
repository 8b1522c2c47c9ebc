"""Activation checkpointing, applied to a built model from outside (the model stays pure).

Each decoder layer keeps only its input for backward and recomputes the rest: at long T the
activations of a layer are far larger than its input.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every decoder layer (``model.model.layers[i]``) in place; parameter names stay loadable."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    return model
