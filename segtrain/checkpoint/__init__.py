"""Checkpoint formats, one owner each: portable model dirs (:mod:`.portable`), Hugging Face dirs (:mod:`.hf`),
the training run directory (:mod:`.run`). :func:`open_model` (:mod:`.open`) opens any of them.

Names resolve lazily (the formats import torch), so ``segtrain <command> --help`` stays fast."""

from __future__ import annotations

from segtrain.lazy import lazy_getattr

_EXPORTS = {
    "ConversionError": "hf",
    "LazyState": "hf",
    "is_hf_dir": "hf",
    "CONFIG_NAME": "portable",
    "WEIGHTS_NAME": "portable",
    "load_config": "portable",
    "load_pretrained": "portable",
    "load_state_dict_into": "portable",
    "open_portable": "portable",
    "save_pretrained": "portable",
    "DTYPES": "open",
    "ModelSource": "open",
    "open_model": "open",
    "torch_dtype": "open",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
