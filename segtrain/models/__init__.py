"""Models whose every attention is ``segment_attention``: ``llama`` (portable, HF names) and its checkpoint I/O."""

from segtrain.models.io import load_config, load_pretrained, load_state_dict_into, save_pretrained
from segtrain.models.llama import LlamaForCausalLM, LlamaModel

__all__ = ["LlamaForCausalLM", "LlamaModel", "load_config", "load_pretrained", "load_state_dict_into", "save_pretrained"]
