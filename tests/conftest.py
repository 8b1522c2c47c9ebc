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
def make_tokenizer(tmp_path_factory):
    """``make_tokenizer(vocab_size, corpus_bytes)``: a BPE tokenizer trained on the first ``corpus_bytes`` of the
    embedded corpus (a few seconds, no network), trained once per session and size, so test files share it."""
    import json

    from segtrain.data.corpus import corpus_documents
    from segtrain.data.tokenizer import train_tokenizer

    made = {}

    def make(vocab_size: int = 400, corpus_bytes: int = 100_000):
        if (vocab_size, corpus_bytes) not in made:
            path = tmp_path_factory.mktemp("tiny_corpus") / "corpus.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for record in corpus_documents(max_bytes=corpus_bytes):
                    f.write(json.dumps(record) + "\n")
            out = tmp_path_factory.mktemp("tiny_tokenizer")
            made[vocab_size, corpus_bytes] = train_tokenizer([path], out, vocab_size=vocab_size)
        return made[vocab_size, corpus_bytes]

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer(make_tokenizer):
    """A 400-piece BPE tokenizer trained on 100 KB of the embedded corpus."""
    return make_tokenizer(400, 100_000)


@pytest.fixture(scope="module")
def megatron_state():
    """A world of one over gloo and megatron's parallel_state with TP=PP=1 (the megatron model on CPU, one process)."""
    import warnings

    import torch.distributed as dist
    from megatron.core import parallel_state

    from segtrain.parallel.groups import _free_port

    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
