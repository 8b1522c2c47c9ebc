"""The embedded default corpus (deterministic, from the standard library) and ``segtrain preprocess`` end to end."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from tool_scripts import load_tool

from segtrain.cli import main
from segtrain.data.corpus import stdlib_modules, write_embedded_corpus
from segtrain.data.gpt import build_gpt_datasets
from segtrain.data.indexed import read_indexed
from segtrain.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


def test_corpus_is_deterministic_and_bounded(tmp_path):
    a = write_embedded_corpus(tmp_path / "a.jsonl", max_bytes=400_000)
    b = write_embedded_corpus(tmp_path / "sub" / "b.jsonl", max_bytes=400_000)
    assert a.read_bytes() == b.read_bytes()
    records = read_jsonl(a)
    size = sum(len(r["text"].encode("utf-8")) for r in records)
    assert 300_000 < size <= 400_000
    sources = [r["source"] for r in records]
    assert len(set(sources)) == len(sources)
    assert any(s.endswith("#docstrings") for s in sources) and any(s.endswith(".py") for s in sources)
    assert all(r["text"].strip() for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "sub"]  # no temp file left behind


def test_corpus_prefix_property(tmp_path):
    """A smaller budget gives a prefix of the larger corpus: the order does not depend on the size."""
    small = read_jsonl(write_embedded_corpus(tmp_path / "s.jsonl", max_bytes=100_000))
    large = read_jsonl(write_embedded_corpus(tmp_path / "l.jsonl", max_bytes=300_000))
    assert large[: len(small)] == small and len(large) > len(small)


def test_corpus_uses_only_portable_stdlib_files():
    modules = stdlib_modules()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [m.relative_to(root).as_posix() for m in modules]
    assert rel == sorted(rel) and len(rel) > 300
    assert not any(part in ("site-packages", "test", "__pycache__") for r in rel for part in r.split("/")[:-1])
    assert not any(Path(r).name.startswith("_sysconfigdata") for r in rel)
    assert "json/decoder.py" in rel


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="out: .* is a directory"):
        write_embedded_corpus(tmp_path)
    with pytest.raises(ValueError, match="max_bytes"):
        write_embedded_corpus(tmp_path / "c.jsonl", max_bytes=0)


def test_preprocess_cli_end_to_end(tmp_path, capsys):
    corpus, tok_dir, prefix = tmp_path / "corpus.jsonl", tmp_path / "tok", tmp_path / "data" / "corpus"
    assert main(["preprocess", "corpus", "--out", str(corpus), "--max-bytes", "300000"]) == 0
    assert main(["preprocess", "tokenizer", "--input", str(corpus), "--vocab-size", "700", "--out", str(tok_dir), "--hf"]) == 0
    assert {p.name for p in tok_dir.iterdir()} == {
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    args = ["preprocess", "data", "--input", str(corpus), "--tokenizer", str(tok_dir), "--out", str(prefix)]
    assert main([*args, "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "corpus.{bin,idx}" in out and "tokens/s" in out

    tok = Tokenizer.load(tok_dir)
    docs = [tok.encode(r["text"], eos=True) for r in read_jsonl(corpus)]
    ds = read_indexed(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    train, valid, _ = build_gpt_datasets(prefix, 128, tok, split="90,10,0", seed=0, cache_dir=tmp_path / "cache")
    assert len(train) > 100 and len(valid) > 5
    sample = train[0]
    assert sample["tokens"].shape == (128,) and int(sample["tokens"].max()) < tok.vocab_size
    assert np.array_equal(sample["tokens"][1:].numpy(), sample["labels"][:-1].numpy())

    # The script in tools/ is the same command.
    script = load_tool("preprocess_data")
    assert (
        script.main(
            [
                "--input",
                str(corpus),
                "--tokenizer",
                str(tok_dir / "tokenizer.model"),
                "--out",
                str(tmp_path / "again"),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "again.bin").read_bytes() == prefix.with_suffix(".bin").read_bytes()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["tokenizer", "--input", "{tmp}/missing.jsonl", "--out", "{tmp}/t"],
            "--input: {tmp}/missing.jsonl matches no readable file",
        ),
        (["tokenizer", "--input", "{tmp}/c.jsonl", "--out", "{tmp}/t", "--vocab-size", "100"], "--vocab-size: 100 is below 260"),
        (
            ["data", "--input", "{tmp}/c.jsonl", "--tokenizer", "{tmp}/nowhere", "--out", "{tmp}/d"],
            "--tokenizer: {tmp}/nowhere does not exist",
        ),
        (
            ["data", "--input", "{tmp}/c.jsonl", "--tokenizer", "{tmp}/c.jsonl", "--out", "{tmp}/d"],
            "--tokenizer: {tmp}/c.jsonl: not a sentencepiece model",
        ),
        (
            ["data", "--input", "{tmp}/c.jsonl", "--tokenizer", "{tmp}/t", "--out", "{tmp}/d.bin"],
            "--out: {tmp}/d.bin should be a prefix",
        ),
        (
            ["data", "--input", "{tmp}/c.jsonl", "--tokenizer", "{tmp}/t", "--out", "{tmp}/d", "--workers", "0"],
            "--workers: must be a positive",
        ),
        (["data", "--input", "{tmp}/bad.jsonl", "--tokenizer", "{tmp}/t", "--out", "{tmp}/d"], "{tmp}/bad.jsonl:1: invalid JSON"),
        (["corpus", "--out", "{tmp}"], "--out: {tmp} is a directory"),
    ],
)
def test_preprocess_cli_errors_name_the_argument(tmp_path, capsys, argv, message):
    (tmp_path / "c.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "tokenizer.model").write_bytes(Tokenizer.load(_tiny_tokenizer(tmp_path)).model_proto)
    assert main(["preprocess", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "d.bin").exists() and not (tmp_path / "d.idx").exists()


def _tiny_tokenizer(tmp_path):
    from segtrain.data.tokenizer import train_tokenizer

    text = tmp_path / "tiny.txt"
    text.write_text("hello world, a tiny tokenizer for error tests\n" * 20)
    return train_tokenizer([text], tmp_path / "tiny", vocab_size=280).model_file
