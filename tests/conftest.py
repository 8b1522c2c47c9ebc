import os

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """An indexed dataset of learnable documents: runs of consecutive ids, each ending in EOD (2)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.fspath(tmp_path_factory.mktemp("data") / "counting")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(200):
        start, n = rng.integers(4, 900), rng.integers(40, 120)
        builder.add_item(torch.from_numpy((start + np.arange(n)) % 1000 + 4).int())
        builder.add_item(torch.tensor([2], dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 400-piece BPE tokenizer trained on 100 KB of the embedded corpus (a few seconds, no network)."""
    import json

    from segtrain.data.corpus import corpus_documents
    from segtrain.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tiny_corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for record in corpus_documents(max_bytes=100_000):
            f.write(json.dumps(record) + "\n")
    return train_tokenizer([path], tmp_path_factory.mktemp("tiny_tokenizer"), vocab_size=400)
