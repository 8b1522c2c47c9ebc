"""jsonl/text -> megatron-core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``), and checks before reading them.

Writing uses megatron-core's own ``IndexedDatasetBuilder``; documents are tokenized by a process pool
in ordered chunks (so the output does not depend on the worker count), each followed by EOD (= the
tokenizer's eos). Both files are written under temporary names and renamed when complete, the old
``.idx`` removed first: a crash leaves either no dataset under the final name or a whole one.

``check_indexed`` validates header, counts, pointers and file sizes with numpy before megatron-core
memory-maps anything, so a truncated or corrupt pair fails with the file's name and the problem
instead of an assertion or a segfault deep inside megatron-core.
"""

from __future__ import annotations

import os
import struct
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np

from segtrain.data.documents import expand_inputs, iter_documents
from segtrain.data.tokenizer import Tokenizer
from segtrain.errors import UserError
from segtrain.progress import show_progress

INDEX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's .idx header: magic, version <Q, dtype code <B, counts <Q <Q
HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


_POOL_CONTEXT = get_context("forkserver" if "forkserver" in get_all_start_methods() else "spawn")
if _POOL_CONTEXT.get_start_method() == "forkserver":  # the server imports this module only, not the caller's script
    _POOL_CONTEXT.set_forkserver_preload([__name__])


class IndexedDataError(UserError):
    """A ``.bin``/``.idx`` pair that is missing, truncated or corrupt; the message names the file."""


def megatron_indexed_dataset():
    """``megatron.core.datasets.indexed_dataset``, imported quietly (it warns that TE/Apex are absent)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 while ids fit (half the bytes), else int32: megatron-core's own rule."""
    return np.uint16 if vocab_size < 65500 else np.int32


# ---------------------------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class IndexSummary:
    """What a valid ``.idx`` describes."""

    prefix: str
    sequences: int
    documents: int
    tokens: int
    dtype: type[np.number]


def check_indexed(prefix: str | os.PathLike) -> IndexSummary:
    """Validates ``prefix.idx`` and ``prefix.bin`` (header, counts, pointers, sizes); raises IndexedDataError."""
    prefix = _strip_suffix(prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for f in (idx, bin_):
        if not f.is_file():
            raise IndexedDataError(f"{f}: missing (indexed datasets are PREFIX.bin + PREFIX.idx)")
    idx_size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < len(INDEX_MAGIC) or head[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise IndexedDataError(f"{idx}: not a megatron-core index (bad magic {head[:9]!r})")
    if len(head) < HEADER_BYTES:
        raise IndexedDataError(f"{idx}: truncated header ({idx_size} bytes, need {HEADER_BYTES})")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    if version != 1:
        raise IndexedDataError(f"{idx}: unsupported index version {version} (expected 1)")
    if code not in DTYPE_CODES:
        raise IndexedDataError(f"{idx}: unknown token dtype code {code}")
    expected = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if idx_size < expected:
        raise IndexedDataError(f"{idx}: truncated: {idx_size} bytes, its header promises {expected}")
    if idx_size == expected + n_seq:
        raise IndexedDataError(f"{idx}: a multimodal index (with sequence modes): not a GPT text dataset")
    if idx_size != expected:
        raise IndexedDataError(f"{idx}: {idx_size - expected} bytes after the end its header describes: corrupt")
    if n_doc < 1:
        raise IndexedDataError(f"{idx}: document index is empty (needs at least the leading 0)")

    mm = np.memmap(idx, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=HEADER_BYTES)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=HEADER_BYTES + 4 * n_seq)
    doc_idx = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=HEADER_BYTES + 12 * n_seq)
    if (lengths < 0).any():
        raise IndexedDataError(f"{idx}: negative sequence lengths: corrupt")
    itemsize = np.dtype(DTYPE_CODES[code]).itemsize
    ends = np.cumsum(lengths, dtype=np.int64) * itemsize
    if n_seq and (pointers[0] != 0 or (pointers[1:] != ends[:-1]).any()):
        raise IndexedDataError(f"{idx}: sequence pointers do not match the sequence lengths: corrupt")
    if doc_idx[0] != 0 or doc_idx[-1] != n_seq or (np.diff(doc_idx) < 0).any():
        raise IndexedDataError(f"{idx}: document index is not 0 .. {n_seq} in order: corrupt")
    bin_expected = int(ends[-1]) if n_seq else 0
    bin_size = bin_.stat().st_size
    if bin_size != bin_expected:
        what = "truncated" if bin_size < bin_expected else "longer than its index"
        raise IndexedDataError(f"{bin_}: {what}: {bin_size} bytes, {idx.name} describes {bin_expected}")
    tokens = bin_expected // itemsize
    del lengths, pointers, doc_idx, mm
    return IndexSummary(os.fspath(prefix), n_seq, n_doc - 1, tokens, DTYPE_CODES[code])


def read_indexed(prefix: str | os.PathLike):
    """megatron-core's ``IndexedDataset`` for ``prefix`` (``ds[i]``: document ``i``'s tokens), after ``check_indexed``."""
    prefix = _strip_suffix(prefix)
    check_indexed(prefix)
    return megatron_indexed_dataset().IndexedDataset(os.fspath(prefix))


def _strip_suffix(prefix: str | os.PathLike) -> str:
    """Accepts ``data/corpus``, ``data/corpus.bin`` or ``data/corpus.idx`` for the prefix ``data/corpus``."""
    text = os.fspath(prefix)
    return text[:-4] if text.endswith((".bin", ".idx")) else text


# ---------------------------------------------------------------------------------------------- writing

_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_proto: bytes) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_proto, source="<worker>")


def _encode_chunk(texts: list[str], bos: bool, eos: bool, dtype, tok: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's tokens as one flat array plus per-document lengths: cheap to send back from a worker.

    One sentencepiece thread per worker: the workers are the parallelism (threads on top oversubscribe)."""
    ids = (tok or _worker_tokenizer).encode_batch(texts, bos=bos, eos=eos, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _chunks(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(documents)
    while chunk := list(islice(it, size)):
        yield chunk


def preprocess(
    inputs,
    tokenizer: Tokenizer | str | os.PathLike,
    out_prefix: str | os.PathLike,
    *,
    workers: int = 2,
    chunk_size: int = 64,
    text_key: str = "text",
    append_eod: bool = True,
    prepend_bos: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenizes every document of ``inputs`` into ``out_prefix.{bin,idx}``.

    Returns ``documents`` (written), ``skipped`` (empty texts), ``tokens``, ``seconds`` and ``tokens_per_s``.
    The output is the same for any ``workers`` (chunks are consumed in input order).
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be a positive integer, got {workers!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    if os.fspath(out_prefix).endswith((".bin", ".idx")):
        raise ValueError(f"out_prefix: {os.fspath(out_prefix)} should be a prefix, without .bin/.idx")
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    tmp_bin, tmp_idx = Path(f"{tmp}.bin"), Path(f"{tmp}.idx")
    documents = iter_documents(expand_inputs(inputs), text_key=text_key)  # a bad path fails here, before any file exists
    dtype = token_dtype(tok.vocab_size)
    stats = {"documents": 0, "skipped": 0, "tokens": 0}
    builder_cls = megatron_indexed_dataset().IndexedDatasetBuilder  # imported before the clock starts (seconds)
    start = time.perf_counter()
    builder = builder_cls(os.fspath(tmp_bin), dtype=dtype)
    try:
        with show_progress(desc=f"tokenize -> {prefix.name}", unit="doc", enabled=progress) as bar:
            for flat, lengths in _encoded_chunks(tok, documents, workers, chunk_size, prepend_bos, append_eod, dtype):
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for begin, end in zip(offsets[:-1], offsets[1:]):
                    if end - begin == int(prepend_bos) + int(append_eod):  # only the special tokens: an empty text
                        stats["skipped"] += 1
                        continue
                    builder.add_document(flat[begin:end], [int(end - begin)])
                    stats["documents"] += 1
                    stats["tokens"] += int(end - begin)
                bar.update(len(lengths))
                bar.set_postfix(tokens=stats["tokens"], refresh=False)
        builder.finalize(os.fspath(tmp_idx))
        Path(f"{prefix}.idx").unlink(missing_ok=True)  # never an old .idx next to a new .bin
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    except BaseException:
        builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
    stats["seconds"] = time.perf_counter() - start
    stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    return stats


def _workers_can_start() -> bool:
    """A worker imports the caller's script (spawn's rule): a script read from stdin cannot be imported again."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return main is None or os.path.isfile(main)


def _encoded_chunks(tok: Tokenizer, documents, workers: int, chunk_size: int, bos: bool, eos: bool, dtype) -> Iterator:
    chunks = _chunks(documents, chunk_size)
    head = list(islice(chunks, workers))
    if workers == 1 or len(head) < workers or not _workers_can_start():  # no pool: nothing to gain, or no workers
        for texts in chain(head, chunks):
            yield _encode_chunk(texts, bos, eos, dtype, tok)
        return
    # Workers start from a fresh interpreter (forkserver; each imports the caller's script, as under spawn), not a fork
    # of this process: a fork copies the locks its threads hold (torch, BLAS), and a child that waits on one hangs.
    # A worker that dies raises BrokenProcessPool here instead of leaving its chunk waited on (multiprocessing.Pool's
    # failure mode).
    # submit with a bounded window instead of map: map would read the whole input ahead of the workers.
    with ProcessPoolExecutor(workers, mp_context=_POOL_CONTEXT, initializer=_init_worker, initargs=(tok.model_proto,)) as pool:
        window: deque = deque()
        for texts in chain(head, chunks):
            window.append(pool.submit(_encode_chunk, texts, bos, eos, dtype))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
