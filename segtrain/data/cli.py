"""``segtrain preprocess {corpus,tokenizer,data}``: the embedded corpus, a tokenizer, an indexed dataset.

    segtrain preprocess corpus --out runs/data/corpus.jsonl
    segtrain preprocess tokenizer --input runs/data/corpus.jsonl --vocab-size 1024 --out runs/tokenizer
    segtrain preprocess data --input runs/data/corpus.jsonl --tokenizer runs/tokenizer --out runs/data/corpus --workers 2

Bad inputs stop before anything is written, with the argument and path in the message; exit status 2.
"""

from __future__ import annotations

import sys

from segtrain.errors import UserError


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="{corpus,tokenizer,data}")
    c = sub.add_parser("corpus", help="write the embedded default corpus (jsonl) from the Python standard library")
    c.add_argument("--out", required=True, help="the jsonl file to write")
    c.add_argument("--max-bytes", type=int, default=4_000_000, help="at most this much text (UTF-8 bytes)")

    t = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer (byte fallback, pad/bos/eos/unk = 0/1/2/3)")
    t.add_argument("--input", nargs="+", required=True, help="jsonl (a 'text' field per line) or text files, directories, globs")
    t.add_argument("--out", required=True, help="directory for tokenizer.model")
    t.add_argument("--vocab-size", type=int, default=1024)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="bpe (default) exports to Hugging Face")
    t.add_argument("--text-key", default="text", help="the jsonl field holding the text")
    t.add_argument("--max-sentences", type=int, default=0, help="train on this many sampled lines (0: all)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hf", action="store_true", help="also write the Hugging Face tokenizer files (LlamaTokenizer) to --out")

    d = sub.add_parser("data", help="tokenize jsonl/text into a megatron-core indexed dataset PREFIX.bin + PREFIX.idx")
    d.add_argument("--input", nargs="+", required=True, help="jsonl (a 'text' field per line) or text files, directories, globs")
    d.add_argument("--tokenizer", required=True, help="a tokenizer directory or .model file")
    d.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    d.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    d.add_argument("--chunk-size", type=int, default=64, help="documents per task sent to a worker")
    d.add_argument("--text-key", default="text", help="the jsonl field holding the text")
    d.add_argument("--no-eod", action="store_true", help="do not append EOD (eos) after each document")
    d.add_argument("--bos", action="store_true", help="prepend BOS to each document")
    d.add_argument("--no-progress", action="store_true")


class ArgumentError(UserError):
    """A command-line value that cannot be used; the message starts with the option."""


def run(args) -> int:
    from segtrain.data.documents import InputError
    from segtrain.data.indexed import IndexedDataError
    from segtrain.data.tokenizer import TokenizerError

    try:
        return {"corpus": _corpus, "tokenizer": _tokenizer, "data": _data}[args.what](args)
    except (ArgumentError, InputError, TokenizerError, IndexedDataError) as e:
        print(f"segtrain preprocess {args.what}: error: {e}", file=sys.stderr)
        return 2


def _positive(option: str, value: int) -> None:
    if value < 1:
        raise ArgumentError(f"{option}: must be a positive integer, got {value}")


def _inputs(args):
    from segtrain.data.documents import expand_inputs

    return expand_inputs(args.input, argument="--input")


def _corpus(args) -> int:
    from pathlib import Path

    from segtrain.data.corpus import write_embedded_corpus

    _positive("--max-bytes", args.max_bytes)
    if Path(args.out).is_dir():
        raise ArgumentError(f"--out: {args.out} is a directory; give a file name such as {Path(args.out) / 'corpus.jsonl'}")
    out = write_embedded_corpus(args.out, args.max_bytes)
    with open(out, encoding="utf-8") as f:
        documents = sum(1 for _ in f)
    print(f"{out}: {documents} documents, {out.stat().st_size:,} bytes")
    return 0


def _tokenizer(args) -> int:
    from segtrain.data.tokenizer import MIN_VOCAB_SIZE, train_tokenizer, write_hf_tokenizer

    if args.vocab_size < MIN_VOCAB_SIZE:
        raise ArgumentError(f"--vocab-size: {args.vocab_size} is below {MIN_VOCAB_SIZE} (4 special + 256 byte pieces)")
    if args.max_sentences < 0:
        raise ArgumentError(f"--max-sentences: must be >= 0, got {args.max_sentences}")
    files = _inputs(args)
    tok = train_tokenizer(
        files,
        args.out,
        args.vocab_size,
        args.model_type,
        text_key=args.text_key,
        max_sentences=args.max_sentences,
        seed=args.seed,
    )
    if args.hf:
        write_hf_tokenizer(tok, args.out)
    print(f"{tok.model_file}: vocab {tok.vocab_size}, {args.model_type}" + (" (+ Hugging Face files)" if args.hf else ""))
    return 0


def _data(args) -> int:
    from segtrain.data.indexed import preprocess
    from segtrain.data.tokenizer import Tokenizer, TokenizerError

    _positive("--workers", args.workers)
    _positive("--chunk-size", args.chunk_size)
    if args.out.endswith((".bin", ".idx")):
        raise ArgumentError(f"--out: {args.out} should be a prefix without .bin/.idx (e.g. {args.out[:-4]})")
    files = _inputs(args)
    try:
        tok = Tokenizer.load(args.tokenizer)
    except TokenizerError as e:
        raise ArgumentError(f"--tokenizer: {e}") from None
    stats = preprocess(
        files,
        tok,
        args.out,
        workers=args.workers,
        chunk_size=args.chunk_size,
        text_key=args.text_key,
        append_eod=not args.no_eod,
        prepend_bos=args.bos,
        progress=not args.no_progress,
    )
    print(
        f"{args.out}.{{bin,idx}}: {stats['documents']:,} documents ({stats['skipped']} empty skipped), "
        f"{stats['tokens']:,} tokens, {stats['seconds']:.2f} s, {stats['tokens_per_s']:,.0f} tokens/s"
    )
    return 0
