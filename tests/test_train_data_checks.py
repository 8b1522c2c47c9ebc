"""Data a model cannot train on fails in one line before the device sees it: token ids past ``model.vocab_size`` (a
tokenizer too large at startup, indexed data made with another tokenizer at its first bad batch) and a ``data.split``
that leaves a split empty (megatron-core would loop forever building it)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from train_runs import ENV, ROOT, gpu_env, losses, write_config

from segtrain.checkpoint import run as checkpoint
from segtrain.cli import main
from segtrain.data.gpt import DatasetConfigError, _split_matrix, build_gpt_datasets, split_documents
from segtrain.errors import UserError
from segtrain.train.config import load_train_config
from segtrain.train.data import TokenIdError, TokenIdsInVocabulary, _removed_if_interrupted, build_train_dataset, check_data


def write_corpus(prefix, documents: list[np.ndarray]) -> str:
    """An indexed dataset of ``documents`` (one sequence each, EOD 2 appended, as ``segtrain data`` writes them)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in documents:
        ids = np.concatenate([doc, [2]]).astype(np.int32)
        builder.add_document(torch.from_numpy(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return os.fspath(prefix)


def run_train(config, *extra, timeout=300, env=ENV) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "segtrain.cli", "train", "--config", os.fspath(config), "--no-progress", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    return run.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------- token ids


def test_token_ids_past_the_vocabulary_name_the_source_sample_and_step():
    rng = np.random.default_rng(0)
    rows = [{"tokens": torch.from_numpy(rng.integers(0, 100, 16)), "labels": torch.from_numpy(rng.integers(0, 100, 16))}
            for _ in range(12)]  # fmt: skip
    checked = TokenIdsInVocabulary(rows, 100, 4, lambda i, _: f"data.prefixes: corpus{i}")
    assert all(torch.equal(checked[i]["tokens"], rows[i]["tokens"]) for i in range(12))  # in range: unchanged
    rows[9]["labels"][-1] = 100  # only the window's last token (a label) is past the vocabulary
    rows[6]["tokens"][3] = -1
    past_the_end = r"^data.prefixes: corpus9 holds token id 100 \(sample 9, step 3\) but model.vocab_size is 100"
    with pytest.raises(TokenIdError, match=past_the_end):
        checked[9]
    with pytest.raises(TokenIdError, match=r"corpus6 holds token id -1 \(sample 6, step 2\)"):
        checked[6]
    assert checked[5] is rows[5]


def test_a_synthetic_task_past_the_vocabulary_is_named(tmp_path, corpus, tiny_tokenizer):
    fields = {"data__prefixes": [], "data__synthetic": "passkey", "data__seq_length": 256}
    cfg = load_train_config(write_config(tmp_path, corpus, model__vocab_size=300, **fields,
                                         data__tokenizer=os.fspath(tiny_tokenizer.model_file)))  # fmt: skip
    data = build_train_dataset(cfg, 8, samples_per_step=2)
    with pytest.raises(TokenIdError, match=r"^data.synthetic: task passkey holds token id 3\d\d \(sample 0, step 1\)"):
        data[0]


def test_a_tokenizer_larger_than_the_model_stops_the_run_before_it_starts(tmp_path, corpus, tiny_tokenizer):
    config = write_config(tmp_path, corpus, model__vocab_size=300, data__tokenizer=os.fspath(tiny_tokenizer.model_file))
    line = one_line_error(run_train(config))
    assert line == (
        f"segtrain train: error: data.tokenizer: {tiny_tokenizer.model_file} has 400 ids but model.vocab_size is 300: "
        "use the model's tokenizer, or a model with a vocabulary at least as large"
    )
    assert not (tmp_path / "run").exists()  # refused before the run folder is claimed or a model built


def test_a_model_directorys_transformers_tokenizer_counts_its_added_tokens(tmp_path, corpus):
    """An HF tokenizer (Llama 3's kind) with 9 words and 2 added special tokens: 11 ids, more than a 10-id model."""
    import transformers
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel

    words = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "a", "mat"]
    raw = RawTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|a|>", "<|b|>"]})
    tok.save_pretrained(tmp_path / "model")
    for vocab_size, refused in ((10, True), (11, False)):
        cfg = load_train_config(write_config(tmp_path, corpus, model__vocab_size=vocab_size, data__split="100,0,0",
                                             data__tokenizer=os.fspath(tmp_path / "model")))  # fmt: skip
        if refused:
            with pytest.raises(UserError, match=r"^data.tokenizer: .*/model has 11 ids but model.vocab_size is 10"):
                check_data(cfg, 2)
        else:
            check_data(cfg, 2)


def test_indexed_data_from_another_tokenizer_fails_at_its_first_bad_batch(tmp_path):
    bad_batch_fails_in_one_line(tmp_path, ENV)


@pytest.mark.gpu
def test_on_cuda_a_bad_batch_is_one_line_not_a_device_side_assert(tmp_path):
    """On a GPU: ``pytest -m gpu tests/test_train_data_checks.py``. The batch never reaches the device."""
    bad_batch_fails_in_one_line(tmp_path, gpu_env())


def bad_batch_fails_in_one_line(tmp_path, env) -> None:
    """Ids below 500 except one document's, read by a later step: the run trains up to that step and stops there."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(4, 500, rng.integers(40, 120)) for _ in range(60)]
    docs[37][5] = 777
    prefix = write_corpus(tmp_path / "corpus", docs)
    (tmp_path / "probe").mkdir()
    fields = {"data__split": "100,0,0", "steps": 20}  # 40 samples: more than the epoch of ~37
    probe = build_train_dataset(load_train_config(write_config(tmp_path / "probe", prefix, **fields)), 40, 2)
    bad = next(i for i in range(40) if int(probe[i]["tokens"].max()) == 777 or int(probe[i]["labels"].max()) == 777)
    step = bad // 2 + 1  # micro_batch_size 2, one process
    assert step > 1, "the bad document should come after the first step"

    config = write_config(tmp_path, prefix, model__vocab_size=512, **fields)
    line = one_line_error(run_train(config, env=env))
    assert line == (
        f"segtrain train: error: data.prefixes: {prefix} holds token id 777 (sample {bad}, step {step}) but "
        "model.vocab_size is 512: was it tokenized with another tokenizer than the model's?"
    )
    assert sorted(losses(tmp_path / "run")) == list(range(1, step))  # the steps before it trained


# ---------------------------------------------------------------------------------------------- data.split


def test_split_documents_are_megatrons_own_counts(tmp_path):
    rng = np.random.default_rng(2)
    prefix = write_corpus(tmp_path / "c", [rng.integers(4, 900, 50) for _ in range(13)])
    for split in ("98,2,0", "80,10,10", "50,25,25", "1,1,1", "90,5,5"):
        built = build_gpt_datasets(prefix, 16, None, split=split, cache_dir=tmp_path / "cache")
        assert split_documents(_split_matrix(split), 13) == [None if d is None else len(d.indices) for d in built], split


def test_a_split_that_leaves_one_empty_is_refused_by_name(tmp_path):
    rng = np.random.default_rng(3)
    prefix = write_corpus(tmp_path / "c", [rng.integers(4, 900, 50) for _ in range(10)])
    with pytest.raises(DatasetConfigError) as e:
        build_gpt_datasets(prefix, 16, None, split="98,2,0", num_samples=(100, 0, 0))
    assert str(e.value) == (
        f"split: '98,2,0' leaves the validation split of {prefix} with 0 of its 10 documents "
        "(train 10, validation 0, test 0); use '100,0,0' or more documents"
    )
    with pytest.raises(DatasetConfigError, match=r"the test split .* \(train 8, validation 2, test 0\); use '80,19,0' or more"):
        build_gpt_datasets(prefix, 16, None, split="80,19,1", num_samples=(100, 0, 5))
    with pytest.raises(DatasetConfigError, match=r"the train split .*; use more documents$"):
        build_gpt_datasets(prefix, 16, None, split="1,99", num_samples=(100, 0, 0))
    assert build_gpt_datasets(prefix, 16, None, split="98,2,0", num_samples=(100, None, None))[1].indices.size == 0


def test_a_small_corpus_with_the_default_split_fails_in_one_line_instead_of_hanging(tmp_path, capsys):
    rng = np.random.default_rng(4)
    prefix = write_corpus(tmp_path / "corpus", [rng.integers(4, 900, 300) for _ in range(10)])
    line = one_line_error(run_train(write_config(tmp_path, prefix), timeout=120))  # megatron-core loops forever without it
    assert line == (
        f"segtrain train: error: data.split: '98,2,0' leaves the validation split of {prefix} with 0 of its 10 documents "
        "(train 10, validation 0, test 0); use '100,0,0' or more documents"
    )
    assert not (tmp_path / "run").exists()
    assert main(["train", "--config", os.fspath(tmp_path / "train.yaml"), "--check"]) == 2  # launch/train.sh runs it first
    assert capsys.readouterr().err.strip().endswith("use '100,0,0' or more documents")


# ---------------------------------------------------------------------------------------------- stop during the build


def test_an_interrupted_build_removes_what_it_wrote(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kept.npy").write_bytes(b"an earlier run's complete index")
    with pytest.raises(KeyboardInterrupt), _removed_if_interrupted(cache):
        (cache / "new-description.txt").write_text("complete")
        (cache / "new-document_index.npy").write_bytes(b"half")
        raise KeyboardInterrupt
    assert [p.name for p in cache.iterdir()] == ["kept.npy"]
    with _removed_if_interrupted(cache):
        (cache / "done.npy").write_bytes(b"whole")
    assert sorted(p.name for p in cache.iterdir()) == ["done.npy", "kept.npy"]


@pytest.mark.slow
def test_sigterm_during_a_long_dataset_build_stops_the_run(tmp_path):
    """One short document and a huge step count: megatron-core counts epochs one by one for minutes. SIGTERM then
    ends the run at once (exit 143, one line), with no index file left in the cache."""
    prefix = write_corpus(tmp_path / "corpus", [np.arange(4, 204)])
    config = write_config(tmp_path, prefix, steps=10**9, data__split="100,0,0", save_every=10**9)
    cmd = [sys.executable, "-m", "segtrain.cli", "train", "--config", os.fspath(config), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "run"
    try:
        deadline = time.time() + 300
        while not (run_dir / checkpoint.RUN_FILE).is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(15)  # the tiny model and its engine take a few seconds; the build then runs for minutes
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.splitlines()[-1] == "segtrain train: stopped by SIGTERM during startup, before the first step: nothing was saved"
    assert "Traceback" not in err
    assert not any((run_dir / "data_cache").glob("*"))  # nothing half-written (nothing at all: it stopped mid-count)
