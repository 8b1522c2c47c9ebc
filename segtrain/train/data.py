"""Training samples for the loop: megatron-core GPT datasets over indexed data, or a synthetic long-range task.

Sample ``i`` is a pure function of ``i`` and the seed, which is what makes resumption and DP layouts
reproducible. Each sample is a dict with ``tokens``, ``labels`` (shifted), ``loss_mask`` and ``position_ids``.
"""

from __future__ import annotations

from pathlib import Path

from segtrain.config import ConfigError


def build_train_dataset(cfg, num_samples: int):
    """The training split with at least ``num_samples`` samples (megatron-core repeats epochs as needed)."""
    d = cfg.data
    if d.synthetic is not None:
        from segtrain.data.synthetic import SyntheticDataset

        if d.tokenizer is None:
            raise ConfigError("data.tokenizer: synthetic tasks need a tokenizer to write their text")
        tasks = d.synthetic.split("+")
        return SyntheticDataset(tasks, d.tokenizer, d.seq_length, num_samples, seed=cfg.seed, **d.synthetic_options)
    from segtrain.data.gpt import build_gpt_datasets

    data = list(d.prefixes) if d.weights is None else [(float(w), p) for w, p in zip(d.weights, d.prefixes)]
    train, _, _ = build_gpt_datasets(
        data,
        d.seq_length,
        d.tokenizer,
        split=d.split,
        seed=cfg.seed,
        num_samples=(num_samples, 0, 0),
        cache_dir=Path(cfg.out_dir) / "data_cache",
        reset_position_ids=d.reset_position_ids,
        eod_mask_loss=d.eod_mask_loss,
        vocab_size=cfg.model.vocab_size,
    )
    if train is None or len(train) < num_samples:
        raise ConfigError(f"data.split: {d.split!r} leaves no training documents in {list(d.prefixes)}")
    return train
