"""The sentencepiece tokenizer: fixed special ids, exact round trips (byte fallback), determinism, HF export."""

import json
import pickle

import pytest
import sentencepiece as spm

from segtrain.data.corpus import corpus_documents
from segtrain.data.documents import InputError
from segtrain.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer, write_hf_tokenizer

TEXTS = [
    "Hello, world! def f(x):\n    return x + 1\n",
    "Ünïcödé: façade, naïve, Straße, 日本語のテキスト, Ελληνικά, emoji 🙂🚀",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "numbers 1234567890 and 3.14159",
    "",
    " ",
    "\x00\x01 control \u200b zero-width",
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for record in corpus_documents(max_bytes=300_000):
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(corpus_file, tmp_path_factory):
    return train_tokenizer([corpus_file], tmp_path_factory.mktemp("tok"), vocab_size=800)


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tok.vocab_size == len(tok) == 800
    assert tok.model_type == "bpe"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # specials decode to nothing


def test_unseen_characters_use_byte_pieces(tok):
    ids = tok.encode("🙂")
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_encoding_is_additive_over_single_spaces(tok):
    """What the synthetic tasks rely on: parts encoded alone and joined by a space equal the joined text."""
    parts = ["The pass key is 68415.", "Remember it.", "amber-falcon: 4821.", "What is the pass key?", "naïve façade"]
    joined = tok.encode(" ".join(parts))
    assert joined == tok.encode(parts[0]) + [i for p in parts[1:] for i in tok.encode(" " + p)]


def test_batch_encoding_matches_single(tok):
    assert tok.encode_batch(TEXTS, eos=True) == [tok.encode(t, eos=True) for t in TEXTS]


def test_training_is_deterministic(corpus_file, tok):
    again = train_tokenizer([corpus_file], None, vocab_size=800)
    assert again.model_proto == tok.model_proto
    other = train_tokenizer([corpus_file], None, vocab_size=700)
    assert other.model_proto != tok.model_proto


def test_save_load_and_pickle(tok, tmp_path):
    path = tok.save(tmp_path / "saved")
    assert path.name == "tokenizer.model"
    for source in (tmp_path / "saved", path):
        loaded = Tokenizer.load(source)
        assert loaded.model_proto == tok.model_proto
        assert loaded.model_file == str(path)
        assert loaded.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match="missing does not exist"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer here"):
        Tokenizer.load(tmp_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model: not a sentencepiece model"):
        Tokenizer.load(junk)


def test_load_rejects_other_special_id_layouts(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text to train on\n" * 50 + "another line of words here\n" * 50)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "llama"), vocab_size=20, minloglevel=2)
    with pytest.raises(TokenizerError, match=r"llama.model: special ids are .*need"):
        Tokenizer.load(tmp_path / "llama.model")  # sentencepiece's default layout: unk=0, bos=1, eos=2, no pad


def test_training_errors_name_the_argument(corpus_file, tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_tokenizer([corpus_file], None, vocab_size=100)
    with pytest.raises(TokenizerError, match="model_type"):
        train_tokenizer([corpus_file], None, model_type="wordpiece")
    with pytest.raises(InputError, match="nothing-here.jsonl"):
        train_tokenizer([tmp_path / "nothing-here.jsonl"], None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: no 'text' field"):
        train_tokenizer([bad], None)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer([empty], None)


def test_hf_export_encodes_identically(tok, corpus_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = write_hf_tokenizer(tok, tmp_path / "hf", model_max_length=4096)
    assert {p.name for p in out.iterdir()} == {
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    docs = [json.loads(line)["text"] for line in corpus_file.read_text(encoding="utf-8").split("\n") if line][:40]
    for cls in (transformers.LlamaTokenizer, transformers.LlamaTokenizerFast, transformers.AutoTokenizer):
        hf = cls.from_pretrained(out)
        assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
        assert hf.model_max_length == 4096
        for text in TEXTS + docs:
            assert hf.encode(text) == tok.encode(text, bos=True), text[:60]
            assert hf.decode(tok.encode(text), skip_special_tokens=True) == text


def test_hf_export_refuses_unigram(tmp_path):
    text = tmp_path / "t.txt"
    words = ["".join("abcde"[(i * 7 + j * j) % 5] for j in range(2 + i % 6)) for i in range(400)]
    text.write_text("\n".join(" ".join(words[(i + j) % 400] for j in range(12)) for i in range(400)))
    uni = train_tokenizer([text], None, vocab_size=300, model_type="unigram")
    assert uni.model_type == "unigram"
    with pytest.raises(TokenizerError, match="needs a BPE model"):
        write_hf_tokenizer(uni, tmp_path / "hf")
