"""Regional ``torch.compile`` of the portable model (the ``compile`` training option).

Each decoder layer runs three calls (``models/llama.py``): ``before_attention`` (norm, projections,
RoPE), the attention slot, ``after_attention`` (output projection, residuals, norm, SwiGLU MLP). The
two around the slot are compiled with ``fullgraph=True``, and so is the loss chunk (final norm, LM
head, cross-entropy; also the fused loss's chunk, gradients included). Inductor fuses the float32
RMSNorm, RoPE, SiLU-times-up and the residual adds into a few kernels, and saves fewer tensors for
backward. The slot stays eager: its block masks are built and cached in Python, and context
parallelism and the inference engine replace it.

Every layer shares one graph (the code is the same and ``nn.Module`` parameters are graph inputs),
so compiling costs one trace per region, not one per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.fused_loss import chunk_loss_and_grads

__all__ = ["compile_model"]


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile, in place, the regions around every attention slot of a portable ``LlamaForCausalLM`` and its loss chunk.

    Call it before activation checkpointing wraps the layers. ``backend="aot_eager"`` traces the same
    graphs without generating kernels (the CPU tests use it: it needs no C++ compiler).
    """
    for layer in model.model.layers:
        layer.before_attention = compile_region(layer.before_attention, backend)
        layer.after_attention = compile_region(layer.after_attention, backend)
    model._chunk_ce = compile_region(model._chunk_ce, backend)
    model._chunk_grads = compile_region(chunk_loss_and_grads, backend)
    return model


def compile_region(fn, backend: str = "inductor"):
    """``torch.compile(fn, fullgraph=True)`` that remembers ``fn`` and the backend (``uncompiled``, ``backend``):
    activation checkpointing recompiles a region with the checkpoint inside its graph."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    compiled.uncompiled, compiled.backend = fn, backend
    return compiled
