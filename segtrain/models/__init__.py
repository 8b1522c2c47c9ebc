"""Models whose every attention is ``segment_attention`` through one slot per layer: ``llama`` (portable, HF names)
and ``megatron`` (megatron-core, TP/PP). Their checkpoint formats live in :mod:`segtrain.checkpoint`."""

from segtrain.models.llama import LlamaForCausalLM, LlamaModel

__all__ = ["LlamaForCausalLM", "LlamaModel"]
