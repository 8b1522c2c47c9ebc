"""Regional ``torch.compile`` of the portable model (the ``portable.compile`` training option).

Each decoder layer runs three calls (``models/llama.py``): ``before_attention`` (norm, projections,
RoPE), the attention slot, ``after_attention`` (output projection, residuals, norm, SwiGLU MLP). The
two around the slot are compiled with ``fullgraph=True``, and so is the loss chunk (final norm, LM
head, cross-entropy; also the fused loss's chunk, gradients included). Inductor fuses the float32
RMSNorm, RoPE, SiLU-times-up and the residual adds into a few kernels, and saves fewer tensors for
backward. The slot stays eager: its block masks are built and cached in Python, and context
parallelism and the inference engine replace it.

Every layer shares one graph (the code is the same and ``nn.Module`` parameters are graph inputs),
so compiling costs one trace per region, not one per layer. Only :mod:`segtrain.speed.portable` applies it.
"""

from __future__ import annotations

import torch

__all__ = ["compile_region"]


def compile_region(fn, backend: str | None):
    """``torch.compile(fn, fullgraph=True)`` (a graph break fails at the first call); ``backend=None``: ``fn`` as it is.
    ``backend="aot_eager"`` traces the same graphs without generating kernels (the CPU tests: no C++ compiler)."""
    if backend is None:
        return fn
    return torch.compile(fn, fullgraph=True, backend=backend)
