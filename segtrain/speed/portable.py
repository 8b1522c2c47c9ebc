"""The portable model's assembly: the one place that applies compile, activation checkpointing and host offload,
in that order (torchtitan's ``parallelize_llama``). Training, ``tools/bench_train.py`` and ``segtrain calibrate``
call :func:`parallelize_portable`; nothing else changes a built model's code.

Each decoder layer is replaced in ``model.model.layers`` by an :class:`AssembledLayer`, a module wrapper that runs
the layer's three calls (``before_attention``, the attention slot, ``after_attention``) with the regions the options
ask for; its state-dict names are the layer's (torch's ``ActivationWrapper``, as ``checkpoint_wrapper``), so a
checkpoint loads into a plain model. The loss chunk's compiled functions go into the model's two chunk attributes
(``_chunk_ce``, ``_chunk_grads``), set here only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper

from segtrain.models.fused_loss import chunk_loss_and_grads
from segtrain.models.llama import call_slot
from segtrain.speed.activation_checkpoint import checkpoint_whole, recomputed_region
from segtrain.speed.activation_offload import ActivationOffload
from segtrain.speed.compile import compile_region

__all__ = ["ActivationOptions", "AssembledLayer", "offload_of", "parallelize_portable"]


@dataclass
class ActivationOptions:
    """What the portable model keeps for backward (``portable.activation``; checked by the portable recipe's config)."""

    checkpointing: bool = False  # recompute each decoder layer in backward: long sequences on one GPU
    layers: int | None = None  # checkpoint only the first N decoder layers (of each pipeline stage); None: every one
    # of the checkpointed layers, the first N recompute only the code around their attention slot and keep what the slot
    # saved (q, k, v, out, LSE): the attention forward runs once
    keep_attention: int = 0
    # of the layers that keep their attention, the first N also keep the outputs of their output, gate and up
    # projections (1.1 GiB a layer at the 1B shape and 32K tokens; meant for offload)
    keep_matmuls: int = 0
    # what the checkpointed layers keep (inputs, kept attention tensors) waits in pinned host memory between forward
    # and backward: keep attention in every layer at the memory of full recompute
    offload: bool = False


def parallelize_portable(
    model: nn.Module,
    *,
    compile: bool = False,
    activation: ActivationOptions | None = None,
    backend: str = "inductor",
    offload_keep_last: int = 1,
    offload_min_bytes: int = 8 << 20,
) -> nn.Module:
    """Apply the speed options to a portable ``LlamaForCausalLM``, in place, and return it.

    Order: compile the regions around each attention slot (``backend``: torch.compile's) and the loss chunk; checkpoint
    the first ``activation.layers`` layers (the first ``keep_attention`` around their slot, the others whole); offload
    what the checkpointed layers keep, except the last ``offload_keep_last`` layers' (their backward comes first) and
    tensors under ``offload_min_bytes``. Call it once; CP or the engine may fill the slots before or after (each wrapper
    reads its layer's slot at every call).
    """
    activation = activation or ActivationOptions()
    layers = model.model.layers
    if any(isinstance(layer, AssembledLayer) for layer in layers):
        raise ValueError("parallelize_portable: this model is assembled already")
    region_backend = backend if compile else None
    if compile:
        model._chunk_ce = compile_region(model._chunk_ce, backend)
        model._chunk_grads = compile_region(chunk_loss_and_grads, backend)
    if not (compile or activation.checkpointing):
        return model
    n = len(layers)
    wrapped = 0 if not activation.checkpointing else n if activation.layers is None else min(activation.layers, n)
    for i in range(n):
        how = None if i >= wrapped else "around_attention" if i < activation.keep_attention else "layer"
        layers[i] = AssembledLayer(layers[i], region_backend, how, keep_matmuls=i < activation.keep_matmuls)
    if activation.offload:
        _offload(layers, ActivationOffload(offload_min_bytes), offload_keep_last, ahead=2 if activation.keep_matmuls else 1)
    return model


def _offload(layers: nn.ModuleList, offload: ActivationOffload, keep_last: int, ahead: int) -> None:
    """Checkpointed layers but the last ``keep_last`` offload (a layer that is not checkpointed saves everything, more
    than PCIe can move in time). Each layer's output gets a gradient hook that fetches the ``ahead`` offloaded layers
    before it: one ahead suffices when a layer's copy takes less time than its backward; layers that keep their
    matmuls' outputs need two (1.6 GiB take about 36 ms; a backward about 30)."""
    offloaded = [i < len(layers) - keep_last and layer.checkpoint is not None for i, layer in enumerate(layers)]
    for i, layer in enumerate(layers):
        before = [j for j in range(i) if offloaded[j]][::-1][:ahead]  # nearest first
        if offloaded[i] or before:
            layer.offload, layer.offload_index, layer.prefetch = offload, i if offloaded[i] else None, before


def offload_of(model: nn.Module) -> ActivationOffload | None:
    """The :class:`ActivationOffload` the assembly gave ``model``'s layers, if any."""
    return next((layer.offload for layer in model.model.layers if getattr(layer, "offload", None) is not None), None)


class AssembledLayer(ActivationWrapper):
    """A decoder layer as the assembly runs it: ``before_attention`` and ``after_attention`` compiled (``backend``)
    and/or recomputed (``checkpoint="around_attention"``), or the whole layer recomputed (``"layer"``), or neither;
    with ``offload`` set, what it saves goes through it. The wrapped layer's own code is unchanged."""

    def __init__(self, layer: nn.Module, backend: str | None, checkpoint: str | None, keep_matmuls: bool = False):
        super().__init__(layer)
        self.checkpoint = checkpoint
        around = checkpoint == "around_attention"
        self.before = (
            recomputed_region(layer.before_attention, backend) if around else compile_region(layer.before_attention, backend)
        )
        after = layer.after_attention
        self.after = recomputed_region(after, backend, keep_matmuls) if around else compile_region(after, backend)
        self.offload: ActivationOffload | None = None
        self.offload_index: int | None = None  # this layer's place in the offload; None: it keeps its tensors
        self.prefetch: list[int] = []  # offloaded layers fetched when this one's backward begins

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], documents=None) -> torch.Tensor:
        """``documents``: document mode's packed documents, handed to the slot (``DecoderLayer.forward``'s)."""
        if self.offload is not None:
            return self.offload.run(self.offload_index, self.prefetch, self._layer, x, rope, documents)
        return self._layer(x, rope, documents)

    def _layer(self, x, rope, documents=None):
        if self.checkpoint == "layer" and torch.is_grad_enabled():
            return checkpoint_whole(self._three_calls, x, rope, documents)
        return self._three_calls(x, rope, documents)

    def _three_calls(self, x, rope, documents=None):
        """``DecoderLayer.forward`` with this wrapper's regions around the layer's slot."""
        slot = self._checkpoint_wrapped_module.self_attn.core_attention
        return self.after(x, call_slot(slot, self.before(x, rope), documents))
