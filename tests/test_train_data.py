"""``data.loss_average: sample``: per-sample weights make the one weighted-mean loss a mean of per-sample means."""

import os
from pathlib import Path

import torch
from train_runs import write_config

from segtrain.loss import IGNORE_INDEX, mean_loss
from segtrain.train.config import load_train_config
from segtrain.train.data import BlendedDataset, PerSampleMean, build_train_dataset

ROOT = Path(__file__).resolve().parents[1]


def _rows(seed: int = 0):
    """Samples with very different numbers of counted positions: 2 answer tokens, a whole text row, ignored labels,
    a fractional mask, and none at all."""
    g = torch.Generator().manual_seed(seed)
    T = 64
    rows = []
    for counted in (2, T, 17, 5, 0):
        labels = torch.randint(0, 100, (T,), generator=g)
        mask = torch.zeros(T, dtype=torch.float64)  # float64 masks: the weights keep their precision
        mask[torch.randperm(T, generator=g)[:counted]] = 1.0
        if counted == 17:
            labels[:7] = IGNORE_INDEX  # ignored labels do not count even where the mask is 1
        if counted == 5:
            mask = mask * 0.5  # a fractional mask keeps its shape: only the sample's total is scaled
        rows.append({"tokens": torch.randint(0, 100, (T,), generator=g), "labels": labels, "loss_mask": mask})
    return rows


def test_per_sample_weights_make_the_loss_the_mean_of_sample_means():
    rows = _rows()
    weighted = PerSampleMean(rows)
    per_token = torch.rand(len(rows), 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    batch = [weighted[i] for i in range(len(rows))]
    labels = torch.stack([r["labels"] for r in batch])
    loss = mean_loss(per_token, labels, torch.stack([r["loss_mask"] for r in batch]).double())

    means = []  # brute force, float64: each sample's own weighted mean, then the plain mean over samples that count
    for i, r in enumerate(rows):
        w = [float(r["loss_mask"][t]) for t in range(64) if int(r["labels"][t]) != IGNORE_INDEX]
        x = [float(per_token[i, t]) for t in range(64) if int(r["labels"][t]) != IGNORE_INDEX]
        if sum(w) > 0:
            means.append(sum(a * b for a, b in zip(w, x)) / sum(w))
    assert len(means) == 4  # the sample with nothing counted adds nothing
    torch.testing.assert_close(loss, torch.tensor(sum(means) / len(means), dtype=torch.float64), rtol=1e-12, atol=0)

    token_mean = mean_loss(per_token, labels, torch.stack([r["loss_mask"] for r in rows]).double())
    assert abs(float(token_mean) - float(loss)) > 0.05  # the two averages really differ on such a batch
    assert torch.equal(weighted[0]["tokens"], rows[0]["tokens"]) and len(weighted) == len(rows)


def test_loss_average_sample_wraps_every_training_source(tmp_path, corpus, tiny_tokenizer):
    """Indexed data alone, synthetic alone, and the blend: each sample's weights sum to 1."""
    tokenizer = tiny_tokenizer.model_file
    cases = {
        "indexed": {"data__seq_length": 256},
        "synthetic": {
            "data__seq_length": 256,
            "data__prefixes": [],
            "data__synthetic": "passkey",
            "data__tokenizer": os.fspath(tokenizer),
        },
        "blend": {
            "data__seq_length": 256,
            "data__synthetic": "passkey",
            "data__tokenizer": os.fspath(tokenizer),
            "data__synthetic_fraction": 0.5,
        },
    }
    for name, fields in cases.items():
        for sub in (name, name + "_t"):
            (tmp_path / sub).mkdir()
        cfg = load_train_config(write_config(tmp_path / name, corpus, data__loss_average="sample", **fields))
        data = build_train_dataset(cfg, 16)
        assert isinstance(data, PerSampleMean), name
        if name == "blend":
            assert isinstance(data.dataset, BlendedDataset)
        for i in range(8):
            torch.testing.assert_close(data[i]["loss_mask"].sum().double(), torch.tensor(1.0, dtype=torch.float64))
        plain = build_train_dataset(load_train_config(write_config(tmp_path / (name + "_t"), corpus, **fields)), 16)
        assert not isinstance(plain, PerSampleMean)  # the default stays the token mean
