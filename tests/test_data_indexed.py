"""Indexed datasets: preprocessing writes exactly the documents' tokens; GPT datasets cut their concatenation;
corrupt or truncated files fail with the file's name; megatron-core runs here without CUDA or a process group."""

import json
import struct
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
import torch

from segtrain.data.documents import InputError
from segtrain.data.gpt import DatasetConfigError, build_gpt_datasets
from segtrain.data.indexed import IndexedDataError, check_indexed, preprocess, read_indexed
from segtrain.data.tokenizer import Tokenizer

DOCS = [
    "The first document.\nIt has two lines.",
    "",  # empty: skipped, not written
    "Zweites Dokument: Größe, naïve façade, 日本語 🙂",
    "def third(x):\n    return x * 3\n",
    "4th: short",
] + [f"Document number {i}: " + " ".join(f"word{(i * 31 + j) % 97}" for j in range(5 + i % 40)) for i in range(5, 120)]


@pytest.fixture(scope="module")
def tok(make_tokenizer):
    return make_tokenizer(600, 200_000)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    prefix = root / "docs"
    stats = preprocess([write_jsonl(root / "docs.jsonl", DOCS)], tok, prefix, workers=2, chunk_size=7, progress=False)
    return prefix, stats


def expected_docs(tok, texts=DOCS):
    return [tok.encode(t, eos=True) for t in texts if t]


def test_preprocess_writes_exactly_the_documents(tok, dataset):
    prefix, stats = dataset
    expected = expected_docs(tok)
    assert stats["documents"] == len(expected) and stats["skipped"] == 1
    assert stats["tokens"] == sum(map(len, expected)) and stats["tokens_per_s"] > 0
    ds = read_indexed(prefix)
    assert len(ds) == len(expected)
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
        assert ds[i][-1] == tok.eos_id
    assert ds[0].dtype == np.uint16  # vocabulary < 65500
    summary = check_indexed(f"{prefix}.bin")  # a .bin/.idx name is accepted for the prefix
    assert (summary.sequences, summary.documents, summary.tokens) == (len(expected), len(expected), stats["tokens"])
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["docs.bin", "docs.idx", "docs.jsonl"]  # no temp files left


def test_output_does_not_depend_on_workers(tok, dataset, tmp_path):
    prefix, _ = dataset
    preprocess([write_jsonl(tmp_path / "d.jsonl", DOCS)], tok, tmp_path / "one", workers=1, chunk_size=50, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == prefix.with_suffix(suffix).read_bytes()


def test_text_files_bos_and_no_eod(tok, tmp_path):
    (tmp_path / "in").mkdir()
    for i, text in enumerate(DOCS[:4]):
        (tmp_path / "in" / f"{i}.txt").write_text(text, encoding="utf-8")
    preprocess([tmp_path / "in"], tok, tmp_path / "txt", workers=1, prepend_bos=True, append_eod=False, progress=False)
    ds = read_indexed(tmp_path / "txt")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t, bos=True) for t in DOCS[:4] if t]


def test_gpt_dataset_cuts_the_concatenated_documents(tok, dataset):
    prefix, _ = dataset
    seq = 32
    assert not torch.distributed.is_initialized()
    train, valid, test = build_gpt_datasets(prefix, seq, tok, split="100,0,0", seed=5)
    assert valid is None and test is None
    docs = expected_docs(tok)
    # One epoch: documents in megatron-core's shuffled order, concatenated; sample j is window j of that stream.
    stream = np.concatenate([docs[d] for d in train.document_index])
    assert len(train) == (len(stream) - 1) // seq
    for idx in range(len(train)):
        sample = train[idx]
        assert set(sample) >= {"tokens", "labels", "loss_mask", "position_ids"}
        assert sample["tokens"].shape == (seq,) and sample["tokens"].dtype == torch.int64
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        j = int(train.shuffle_index[idx])
        window = np.concatenate([sample["tokens"].numpy(), sample["labels"][-1:].numpy()])
        assert np.array_equal(window, stream[j * seq : (j + 1) * seq + 1])
        assert torch.equal(sample["position_ids"], torch.arange(seq))
        assert torch.all(sample["loss_mask"] == 1)


def test_gpt_dataset_document_handling(tok, dataset, tmp_path):
    prefix, _ = dataset
    train, _, _ = build_gpt_datasets(
        prefix, 64, tok, split="100,0,0", seed=5, reset_position_ids=True, eod_mask_loss=True, cache_dir=tmp_path
    )
    seen_eod = 0
    for idx in range(len(train)):
        s = train[idx]
        is_eod = s["tokens"] == tok.eos_id
        seen_eod += int(is_eod.sum())
        assert torch.equal(s["loss_mask"], (~is_eod).float())  # no loss on predicting across a document end
        expected, pos = [], 0  # positions count from the window start and restart after each EOD
        for token in s["tokens"].tolist():
            expected.append(pos)
            pos = 0 if token == tok.eos_id else pos + 1
        assert s["position_ids"].tolist() == expected
    assert seen_eod > 10
    assert list(tmp_path.glob("*GPTDataset-train-*.npy"))  # the index cache went where we asked


def test_splits_and_sample_counts(tok, dataset):
    prefix, _ = dataset
    train, valid, test = build_gpt_datasets(prefix, 16, tok, split="80,10,10", num_samples=(500, 20, 5), seed=1)
    assert len(train) >= 500 and len(valid) >= 20 and len(test) >= 5  # megatron-core repeats epochs to reach a count
    a = build_gpt_datasets(prefix, 16, tok, split="80,10,10", num_samples=(500, 20, 5), seed=1)[0]
    b = build_gpt_datasets(prefix, 16, tok, split="80,10,10", num_samples=(500, 20, 5), seed=2)[0]
    assert all(torch.equal(train[i]["tokens"], a[i]["tokens"]) for i in range(50))  # a pure function of (i, seed)
    assert not all(torch.equal(train[i]["tokens"], b[i]["tokens"]) for i in range(50))


def test_weighted_blend_without_process_group(tok, tmp_path):
    """megatron-core's BlendedDataset calls torch.distributed.get_rank() on a cache miss; we build it anyway."""
    a_docs = [f"alpha {i} " + "aaa " * (i % 9 + 3) for i in range(60)]
    b_docs = [f"beta {i} " + "bbb " * (i % 7 + 3) for i in range(60)]
    pa, pb = tmp_path / "a", tmp_path / "b"
    preprocess([write_jsonl(tmp_path / "a.jsonl", a_docs)], tok, pa, workers=1, progress=False)
    preprocess([write_jsonl(tmp_path / "b.jsonl", b_docs)], tok, pb, workers=1, progress=False)
    train, _, _ = build_gpt_datasets(
        [(1.0, pa), (3.0, pb)], 16, tok, split="100,0,0", num_samples=(400, 0, 0), cache_dir=tmp_path / "c"
    )
    ids = np.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert len(train) == 400 and abs((ids == 1).mean() - 0.75) < 0.02
    vocab = [set(np.concatenate(expected_docs(tok, docs)).tolist()) for docs in (a_docs, b_docs)]
    assert vocab[0] != vocab[1]
    for i in range(len(train)):
        assert set(train[i]["tokens"].tolist()) <= vocab[ids[i]]  # each sample comes from the dataset it names
    with pytest.raises(ValueError):  # the rank stand-in was scoped to the build
        torch.distributed.get_rank()
    again, _, _ = build_gpt_datasets(
        {pa: 1.0, pb: 3.0}, 16, tok, split="100,0,0", num_samples=(400, 0, 0), cache_dir=tmp_path / "c"
    )
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 400, 37))  # the cached indices


def test_reprocessed_data_is_not_served_from_a_stale_cache(tok, tmp_path):
    """megatron-core keys its index cache by path; rewriting the files under the same prefix must rebuild it."""
    prefix, cache = tmp_path / "d", tmp_path / "cache"
    preprocess([write_jsonl(tmp_path / "1.jsonl", ["one " * 50] * 5)], tok, prefix, workers=1, progress=False)
    first = build_gpt_datasets(prefix, 16, tok, split="100,0,0", cache_dir=cache)[0]
    stats = preprocess([write_jsonl(tmp_path / "2.jsonl", ["two " * 40] * 30)], tok, prefix, workers=1, progress=False)
    second = build_gpt_datasets(prefix, 16, tok, split="100,0,0", cache_dir=cache)[0]
    assert len(second) == (stats["tokens"] - 1) // 16 != len(first)
    assert sorted(int(d) for d in second.document_index) == list(range(30))


def test_dataset_request_errors(tok, dataset):
    prefix, _ = dataset
    with pytest.raises(DatasetConfigError, match="split: .100,0,0.001. leaves the test split"):
        build_gpt_datasets(prefix, 16, tok, split="100,0,0.001", num_samples=(10, 0, 5))
    with pytest.raises(DatasetConfigError, match="num_samples"):
        build_gpt_datasets([(1, prefix), (2, prefix)], 16, tok, split="100,0,0")
    with pytest.raises(DatasetConfigError, match="seq_length"):
        build_gpt_datasets(prefix, 0, tok)
    with pytest.raises(DatasetConfigError, match="weight"):
        build_gpt_datasets({prefix: -1.0}, 16, tok)
    with pytest.raises(DatasetConfigError, match="split"):
        build_gpt_datasets(prefix, 16, tok, split="ninety,ten")


# ---------------------------------------------------------------------------------------------- corruption


def corrupt(prefix, how):
    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    data = bytearray(idx.read_bytes())
    n_seq = struct.unpack("<Q", data[18:26])[0]
    if how == "missing idx":
        idx.unlink()
    elif how == "missing bin":
        bin_.unlink()
    elif how == "bin truncated":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif how == "bin longer":
        bin_.write_bytes(bin_.read_bytes() + b"\x00\x00")
    elif how == "idx truncated":
        idx.write_bytes(data[:-8])
    elif how == "idx trailing bytes":
        idx.write_bytes(data + b"\x00" * 3)
    elif how == "idx header only":
        idx.write_bytes(data[:20])
    elif how == "bad magic":
        idx.write_bytes(b"NOTANIDX\x00" + data[9:])
    elif how == "bad version":
        idx.write_bytes(data[:9] + struct.pack("<Q", 7) + data[17:])
    elif how == "bad dtype":
        idx.write_bytes(data[:17] + bytes([42]) + data[18:])
    elif how == "bad length":
        data[34:38] = struct.pack("<i", 99_999)
        idx.write_bytes(data)
    elif how == "bad document index":
        off = 34 + 12 * n_seq + 8
        data[off : off + 8] = struct.pack("<q", n_seq + 5)
        idx.write_bytes(data)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how, file, message",
    [
        ("missing idx", ".idx", "missing"),
        ("missing bin", ".bin", "missing"),
        ("bin truncated", ".bin", "truncated"),
        ("bin longer", ".bin", "longer than its index"),
        ("idx truncated", ".idx", "truncated"),
        ("idx trailing bytes", ".idx", "bytes after the end"),
        ("idx header only", ".idx", "truncated header"),
        ("bad magic", ".idx", "bad magic"),
        ("bad version", ".idx", "version 7"),
        ("bad dtype", ".idx", "dtype code 42"),
        ("bad length", ".idx", "pointers do not match"),
        ("bad document index", ".idx", "document index"),
    ],
)
def test_corrupt_files_fail_clearly(dataset, tmp_path, tok, how, file, message):
    src, _ = dataset
    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        prefix.with_suffix(suffix).write_bytes(src.with_suffix(suffix).read_bytes())
    corrupt(prefix, how)
    name = f"{prefix}{file}"
    with pytest.raises(IndexedDataError, match=message) as err:
        read_indexed(prefix)
    assert str(err.value).startswith(name)
    with pytest.raises(IndexedDataError, match=message):
        build_gpt_datasets(prefix, 16, tok, split="100,0,0", cache_dir=tmp_path / "cache")


def test_input_errors_name_path_and_line(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: invalid JSON"):
        preprocess([bad], tok, tmp_path / "out", workers=1, progress=False)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", ["x"])
    with pytest.raises(InputError, match=r"wrong.jsonl:1: no 'body' field"):
        preprocess([wrong], tok, tmp_path / "out", workers=1, text_key="body", progress=False)
    with pytest.raises(InputError, match="absent.jsonl"):
        preprocess([tmp_path / "absent.jsonl"], tok, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="out_prefix"):
        preprocess([wrong], tok, tmp_path / "out.bin", progress=False)
    with pytest.raises(ValueError, match="workers"):
        preprocess([wrong], tok, tmp_path / "out", workers=0, progress=False)


def test_a_failed_run_leaves_the_previous_dataset_whole(tok, tmp_path):
    prefix = tmp_path / "data"
    preprocess([write_jsonl(tmp_path / "good.jsonl", DOCS[:5])], tok, prefix, workers=2, progress=False)
    before = {s: prefix.with_suffix(s).read_bytes() for s in (".bin", ".idx")}
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS) + "{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match="broken.jsonl"):
        preprocess([broken], tok, prefix, workers=2, chunk_size=4, progress=False)
    assert {s: prefix.with_suffix(s).read_bytes() for s in (".bin", ".idx")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "data.bin", "data.idx", "good.jsonl"]


class _UnloadableInWorkers(Tokenizer):
    """Encodes here, but hands the pool's workers bytes that are no tokenizer: every worker fails to start."""

    @property
    def model_proto(self) -> bytes:
        return b"not a sentencepiece model"


def test_workers_that_cannot_start_fail_the_run_instead_of_hanging_it(tok, tmp_path):
    """multiprocessing.Pool restarts a worker whose initializer fails, forever, and the chunk it had is waited on
    forever; the run must raise instead, and leave no file behind."""
    broken = _UnloadableInWorkers(tok.model_proto)
    with pytest.raises(BrokenProcessPool):
        preprocess([write_jsonl(tmp_path / "d.jsonl", DOCS)], broken, tmp_path / "out", workers=2, chunk_size=8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
