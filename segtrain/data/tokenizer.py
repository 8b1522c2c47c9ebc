"""The project's tokenizer: a sentencepiece BPE model with byte fallback and one fixed special-id layout.

Every segtrain tokenizer has ``pad=0, bos=1, eos=2, unk=3`` (pieces ``<pad> <s> </s> <unk>``); training
sets them, loading checks them, and datasets (EOD = eos), the trainer and the HF export rely on them.
Byte fallback means every UTF-8 string round-trips (unknown characters become ``<0xNN>`` byte pieces).
Text is encoded as it is: no normalization and no dummy-prefix space, and pieces never cross a single
space, so ``encode(a + " " + b) == encode(a) + encode(" " + b)`` (the synthetic tasks build on that) and
the Hugging Face export encodes identically.
Training is deterministic: a fixed RNG seed and one trainer thread (sentencepiece's result depends on
its thread count), so the same documents give a byte-identical model on every machine.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from segtrain.data.documents import iter_documents
from segtrain.errors import UserError
from segtrain.userfiles import existing_path

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
PAD_PIECE, BOS_PIECE, EOS_PIECE, UNK_PIECE = "<pad>", "<s>", "</s>", "<unk>"
MODEL_FILE = "tokenizer.model"
# The files of a tokenizer in a model directory: a directory holds a tokenizer when it has any of them, and a
# model's tokenizer travels with it (convert, calibrate) as those of them it has. The one list segtrain uses.
TOKENIZER_FILES = (MODEL_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MIN_VOCAB_SIZE = 4 + 256  # the special pieces and the 256 byte-fallback pieces


class TokenizerError(UserError):
    """A tokenizer file or training request that cannot be used; the message names the path or argument."""


class Tokenizer:
    """A loaded sentencepiece model with segtrain's special ids (see the module docstring)."""

    def __init__(self, model_proto: bytes, *, source: str = "<memory>"):
        self.source = source
        self._proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse messages
            raise TokenizerError(f"{source}: not a sentencepiece model ({e})") from None
        expected = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID}
        found = {"pad": self._sp.pad_id(), "bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "unk": self._sp.unk_id()}
        if found != expected:
            raise TokenizerError(f"{source}: special ids are {found}; segtrain tokenizers need {expected}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a ``.model`` file or a directory holding ``tokenizer.model``."""
        path = existing_path(path, error=TokenizerError)
        file = path / MODEL_FILE if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{path}: no tokenizer here (expected a .model file or a directory with {MODEL_FILE})")
        return cls(file.read_bytes(), source=os.fspath(file))

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes ``directory/tokenizer.model`` (atomically); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return _write_atomic(directory / MODEL_FILE, self._proto)

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def model_type(self) -> str:
        """'bpe' or 'unigram' (read from the model's trainer spec)."""
        code = _proto_field(_proto_field(self._proto, 2) or b"", 3)  # ModelProto.trainer_spec.model_type
        return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(code if isinstance(code, int) else 1, "unknown")

    @property
    def model_file(self) -> str | None:
        """The file this tokenizer was loaded from or saved to (None while only in memory)."""
        return None if self.source.startswith("<") else self.source

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return [BOS_ID] * bos + ids + [EOS_ID] * eos

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """``encode`` for many texts at once, in sentencepiece's C++ threads (-1: its default, all cores)."""
        return [[BOS_ID] * bos + ids + [EOS_ID] * eos for ids in self._sp.encode(list(texts), num_threads=num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens (pad/bos/eos) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"

    def __getstate__(self) -> dict:  # picklable for multiprocessing workers
        return {"model_proto": self._proto, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], source=state["source"])


class _HFTokenizer:
    """A transformers tokenizer behind the small interface generation uses (encode, decode, bos_id, eos_id)."""

    def __init__(self, tok):
        self._tok = tok
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False))
        return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * (eos and self.eos_id is not None)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Every id it can produce, added special tokens included (transformers' own ``vocab_size`` leaves them out)."""
        return len(self._tok)


def holds_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether a (model) directory carries a tokenizer: one of :data:`TOKENIZER_FILES` is in it."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def copy_tokenizer(src: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """Copy the tokenizer files (:data:`TOKENIZER_FILES`) ``src`` has into the directory ``out``; returns the copies."""
    import shutil

    files = [Path(src) / name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    return [Path(shutil.copy2(file, Path(out) / file.name)) for file in files]


def load_tokenizer(path: str | os.PathLike):
    """The one way segtrain finds a tokenizer: a sentencepiece file, or a model directory's tokenizer (segtrain's
    sentencepiece one if it has the fixed special ids, else transformers' ``AutoTokenizer`` for other HF models)."""
    path = existing_path(path, error=TokenizerError)
    if path.is_file():
        return Tokenizer.load(path)
    if (path / MODEL_FILE).is_file():
        try:
            return Tokenizer.load(path)
        except TokenizerError:
            pass  # another special-id layout (e.g. Llama 2's): transformers knows it
    if not holds_tokenizer(path):
        raise TokenizerError(f"{path}: no tokenizer files here; pass --tokenizer")
    from transformers import AutoTokenizer

    try:
        return _HFTokenizer(AutoTokenizer.from_pretrained(os.fspath(path)))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: transformers cannot load its tokenizer ({e})") from None


def train_tokenizer(
    inputs,
    out_dir: str | os.PathLike | None = None,
    vocab_size: int = 1000,
    model_type: str = "bpe",
    *,
    text_key: str = "text",
    max_sentences: int = 0,
    max_sentence_length: int = 16384,
    seed: int = 0,
    num_threads: int = 1,
) -> Tokenizer:
    """Trains a tokenizer on documents from ``inputs`` (files, directories, globs: see ``documents``).

    Sentencepiece learns from lines: each non-empty line of each document is one training sentence,
    so newlines themselves are never inside a piece (they encode as the byte piece ``<0x0A>``).
    ``max_sentences > 0`` samples that many lines (seeded) instead of using all of them.
    Saved to ``out_dir/tokenizer.model`` when ``out_dir`` is given.
    """
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type: must be 'bpe' or 'unigram', got {model_type!r}")
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size: must be an integer >= {MIN_VOCAB_SIZE} (specials + 256 bytes), got {vocab_size!r}")
    sentences = list(_sentences(iter_documents(inputs, text_key=text_key), max_sentence_length))
    if not sentences:
        raise TokenizerError(f"input: {inputs!r} holds no text to train on")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=1.0,  # rare characters fall back to bytes at encode time anyway
            normalization_rule_name="identity",  # text round-trips exactly: no NFKC, no whitespace folding
            remove_extra_whitespaces=False,
            split_digits=True,
            add_dummy_prefix=False,  # text after a newline has no prefix either; HF: Metaspace(prepend_scheme="never")
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become one piece
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            pad_piece=PAD_PIECE,
            bos_piece=BOS_PIECE,
            eos_piece=EOS_PIECE,
            unk_piece=UNK_PIECE,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is too high": name the argument
        raise TokenizerError(f"vocab_size: sentencepiece cannot train {vocab_size} pieces on this input ({e})") from None
    tok = Tokenizer(model.getvalue(), source="<trained>")
    if out_dir is not None:
        tok.source = os.fspath(tok.save(out_dir))
    return tok


def _sentences(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    for doc in documents:
        for line in doc.splitlines():
            if line.strip():
                yield (
                    line if len(line.encode("utf-8")) <= max_bytes else line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
                )


def write_hf_tokenizer(
    tokenizer: Tokenizer | str | os.PathLike, out_dir: str | os.PathLike, *, model_max_length: int | None = None
) -> Path:
    """Writes what ``transformers`` needs to load ``tokenizer`` as a ``LlamaTokenizer``/``LlamaTokenizerFast``.

    Files: ``tokenizer.model`` (the sentencepiece model, for slow tokenizers), ``tokenizer.json`` (the
    same BPE for the fast/``tokenizers`` backend, so loading needs neither sentencepiece nor protobuf:
    transformers 5 converts ``tokenizer.model`` only with protobuf installed), ``tokenizer_config.json``
    and ``special_tokens_map.json``. Encoding adds BOS (Llama convention), never EOS.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    _write_atomic(out / "tokenizer.json", _tokenizers_json(tok).encode("utf-8"))
    specials = {"bos_token": BOS_PIECE, "eos_token": EOS_PIECE, "unk_token": UNK_PIECE, "pad_token": PAD_PIECE}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "model_max_length": model_max_length or int(1e30),
        "sp_model_kwargs": {},
        "added_tokens_decoder": {
            str(i): {
                "content": piece,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, piece in sorted(_special_pieces().items())
        },
    }
    _write_atomic(out / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    _write_atomic(out / "special_tokens_map.json", (json.dumps(specials, indent=2) + "\n").encode("utf-8"))
    return out


def _special_pieces() -> dict[int, str]:
    return {PAD_ID: PAD_PIECE, BOS_ID: BOS_PIECE, EOS_ID: EOS_PIECE, UNK_ID: UNK_PIECE}


def _tokenizers_json(tok: Tokenizer) -> str:
    """The sentencepiece BPE as a ``tokenizers`` JSON: vocab in id order, merges ranked by the merged piece's id."""
    try:
        from tokenizers import AddedToken, decoders, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE
    except ImportError:
        raise TokenizerError("the Hugging Face export needs the 'tokenizers' package (it comes with transformers)") from None

    if tok.model_type != "bpe":
        raise TokenizerError(
            f"{tok.source}: the Hugging Face export needs a BPE model (LlamaTokenizer is BPE), not {tok.model_type}"
        )
    vocab = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
    hf = HFTokenizer(BPE(vocab=vocab, merges=_bpe_merges(vocab), unk_token=UNK_PIECE, fuse_unk=True, byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(p, normalized=False, special=True) for _, p in sorted(_special_pieces().items())])
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS_PIECE} $A", pair=f"{BOS_PIECE} $A {BOS_PIECE} $B", special_tokens=[(BOS_PIECE, BOS_ID)]
    )
    return hf.to_str()


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, ranked by the merged piece's id (sentencepiece BPE's merge order)."""
    special = set(_special_pieces().values())
    merges = []
    for piece, piece_id in vocab.items():
        if piece in special:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and left not in special and right not in special:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _proto_field(message: bytes, number: int):
    """The first field ``number`` of a serialized protobuf message (an int or bytes), or None.

    Enough protobuf to read the model type without the ``protobuf`` package (sentencepiece does not need it).
    """
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire == 2:
            size, pos = _varint(message, pos)
            value, pos = message[pos : pos + size], pos + size
        elif wire in (1, 5):
            value, pos = message[pos : pos + (8 if wire == 1 else 4)], pos + (8 if wire == 1 else 4)
        else:
            return None
        if field == number:
            return value
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _write_atomic(path: Path, data: bytes) -> Path:
    """Writes a temp file next to ``path`` and renames it: a crash never leaves a half-written file under the name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # plain open: the file mode follows the umask, like any other output
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
