"""Training samples for the loop: megatron-core GPT datasets over indexed data, synthetic long-range tasks, or a blend.

Sample ``i`` is a pure function of ``i`` and the seed, which is what makes resumption and DP layouts
reproducible. Each sample is a dict with ``tokens``, ``labels`` (shifted), ``loss_mask`` and ``position_ids``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from segtrain.attention.documents import document_loss_mask
from segtrain.config import ConfigError
from segtrain.loss import token_weights


class BlendedDataset(torch.utils.data.Dataset):
    """Sample ``i`` is ``synthetic[i]`` with probability ``fraction``, else ``natural[i]``.

    The choice is a hash of ``(seed, i)`` (``random.Random`` seeded with a string: the same on every
    machine), so sample ``i`` stays a pure function of ``(i, seed)`` and resumption stays exact. Both
    sources are indexed by ``i`` itself: natural samples at synthetic indices are skipped, not shifted.
    """

    def __init__(self, natural, synthetic, fraction: float, seed: int):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        self.natural, self.synthetic, self.fraction, self.seed = natural, synthetic, fraction, seed
        self.num_samples = min(len(natural), len(synthetic))

    def __len__(self) -> int:
        return self.num_samples

    def is_synthetic(self, i: int) -> bool:
        return random.Random(f"blend/{self.seed}/{i}").random() < self.fraction

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} of {self.num_samples}")
        return self.synthetic[i] if self.is_synthetic(i) else self.natural[i]


class PerSampleMean(torch.utils.data.Dataset):
    """``data.loss_average: sample``: each sample's counted positions get weights that sum to 1 (``loss_mask`` scaled by
    the sample's own count). The loss (:func:`segtrain.loss.mean_loss`, a weighted mean) then is the mean over samples
    of each sample's mean, under any parallel layout, since every path weighs positions by ``loss_mask``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = dict(self.dataset[i])
        mask = sample.get("loss_mask")
        dtype = mask.dtype if mask is not None and mask.is_floating_point() else torch.float32
        weights = token_weights(sample["labels"], mask, dtype)  # in the mask's own precision
        count = weights.sum()
        sample["loss_mask"] = weights / count if count > 0 else weights
        return sample


class DocumentBoundaries(torch.utils.data.Dataset):
    """Document mode (``model.documents``): no loss crosses a document boundary. The last token of a document that
    another follows in the sample predicts that document's first token: its ``loss_mask`` becomes 0, whatever the
    source (indexed data also masks its EOD tokens, ``eod_mask_loss``, which covers the sample's last token)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = dict(self.dataset[i])
        positions = torch.as_tensor(sample["position_ids"])
        mask = torch.as_tensor(sample["loss_mask"])
        sample["loss_mask"] = mask * document_loss_mask(positions)[0].to(mask.dtype)
        return sample


def build_train_dataset(cfg, num_samples: int):
    """The training split with at least ``num_samples`` samples (megatron-core repeats epochs as needed)."""
    data = _samples(cfg, num_samples)
    if cfg.model.documents:
        data = DocumentBoundaries(data)
    return PerSampleMean(data) if cfg.data.loss_average == "sample" else data


def _samples(cfg, num_samples: int):
    d = cfg.data
    synthetic = _synthetic(cfg, num_samples) if d.synthetic is not None else None
    if not d.prefixes:
        return synthetic
    natural = _natural(cfg, num_samples)
    if synthetic is None:
        return natural
    return BlendedDataset(natural, synthetic, d.synthetic_fraction, cfg.seed)


def _synthetic(cfg, num_samples: int):
    from segtrain.data.synthetic import SyntheticDataset

    d = cfg.data
    if d.tokenizer is None:
        raise ConfigError("data.tokenizer: synthetic tasks need a tokenizer to write their text")
    from segtrain.data.synthetic import SyntheticError

    try:
        return SyntheticDataset(d.synthetic.split("+"), d.tokenizer, d.seq_length, num_samples, seed=cfg.seed,
                                loss_on=d.synthetic_loss, **d.synthetic_options)  # fmt: skip
    except SyntheticError as e:
        raise ConfigError(f"data.synthetic_options: {e}") from None


def _natural(cfg, num_samples: int):
    from segtrain.data.gpt import build_gpt_datasets

    d = cfg.data
    data = list(d.prefixes) if d.weights is None else [(float(w), p) for w, p in zip(d.weights, d.prefixes)]
    train, _, _ = build_gpt_datasets(
        data,
        d.seq_length,
        d.tokenizer,
        split=d.split,
        seed=cfg.seed,
        num_samples=(num_samples, 0, 0),
        cache_dir=Path(cfg.out_dir) / "data_cache",
        # document mode reads documents from positions that restart after each EOD, and predicts nothing across one
        reset_position_ids=d.reset_position_ids or cfg.model.documents,
        eod_mask_loss=d.eod_mask_loss or cfg.model.documents,
        vocab_size=cfg.model.vocab_size,
    )
    if train is None or len(train) < num_samples:
        raise ConfigError(f"data.split: {d.split!r} leaves no training documents in {list(d.prefixes)}")
    return train
