"""Training samples for the loop: megatron-core GPT datasets over indexed ``.bin``/``.idx`` files.

A thin wrapper: megatron-core builds (and caches) the sample index, blends several datasets by
weight and cuts documents into ``seq_length + 1`` token windows; each sample is a dict with
``tokens``, ``labels`` (shifted), ``loss_mask`` and ``position_ids``. Sample ``i`` is a pure
function of ``i`` and the seed, which is what makes resumption and DP layouts reproducible.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from segtrain.config import ConfigError

DEFAULT_PAD_ID, DEFAULT_EOD_ID = 0, 2  # segtrain tokenizers: pad=0, bos=1, eos=2, unk=3


@dataclass
class TokenIds:
    """What GPTDataset needs of a tokenizer: the end-of-document and padding ids (and the vocabulary size)."""

    eod: int = DEFAULT_EOD_ID
    pad: int = DEFAULT_PAD_ID
    vocab_size: int | None = None
    unique_identifiers: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unique_identifiers = {"class": "segtrain.TokenIds", "eod": self.eod, "pad": self.pad}


def token_ids(tokenizer_path: str | None, vocab_size: int) -> TokenIds:
    if tokenizer_path is None:
        return TokenIds(vocab_size=vocab_size)
    from segtrain.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_path)
    return TokenIds(eod=tok.eos_id, pad=tok.pad_id, vocab_size=vocab_size)


def build_train_dataset(cfg, num_samples: int):
    """The training split, with at least ``num_samples`` samples (megatron-core cycles epochs as needed)."""
    if cfg.data.synthetic is not None:
        raise ConfigError(f"data.synthetic: {cfg.data.synthetic!r} is not available in this build; use data.prefixes")
    with warnings.catch_warnings():  # megatron-core warns that TE/Apex are absent: irrelevant for datasets
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d = cfg.data
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=d.seq_length,
        blend=(list(d.prefixes), None if d.weights is None else [float(w) for w in d.weights]),
        split=d.split,
        tokenizer=token_ids(d.tokenizer, cfg.model.vocab_size),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=False,  # segment attention has no document mask; EOD tokens separate documents
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,  # a [T, T] mask per sample: never at long context
        path_to_cache=os.fspath(Path(cfg.out_dir) / "data_cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    if train is None or len(train) < num_samples:
        raise ConfigError(f"data.split: {d.split!r} leaves no training documents in {list(d.prefixes)}")
    return train
