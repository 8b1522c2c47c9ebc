"""Data: sentencepiece tokenizers, megatron-core indexed datasets, synthetic long-context tasks, the default corpus.

Modules (each importable on its own; names here resolve lazily so ``import segtrain.data`` stays cheap):

- ``tokenizer``: ``Tokenizer``, ``train_tokenizer``, ``write_hf_tokenizer``; ids pad=0, bos=1, eos=2, unk=3.
- ``indexed``: ``preprocess`` (jsonl/text -> ``PREFIX.bin/.idx``), ``check_indexed``, ``read_indexed``.
- ``gpt``: ``build_gpt_datasets`` (megatron-core GPTDataset splits, blended by weight) for training.
- ``synthetic``: ``make_sample``, ``eval_set``, ``SyntheticDataset`` (passkey, needle, recall).
- ``corpus``: ``write_embedded_corpus`` (the standard library's docstrings and source, as jsonl).
- ``documents``: ``iter_documents``: the one reader of input files. ``cli``: ``segtrain preprocess``.
"""

from __future__ import annotations

from segtrain.lazy import lazy_getattr

_EXPORTS = {
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "write_hf_tokenizer": "tokenizer",
    "preprocess": "indexed",
    "check_indexed": "indexed",
    "read_indexed": "indexed",
    "build_gpt_datasets": "gpt",
    "make_sample": "synthetic",
    "eval_set": "synthetic",
    "SyntheticDataset": "synthetic",
    "write_embedded_corpus": "corpus",
    "iter_documents": "documents",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
