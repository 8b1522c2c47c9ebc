"""``segtrain demo``: the whole pipeline on the embedded default, on CPU, in a minute or two.

Corpus (the Python standard library's source) -> sentencepiece tokenizer -> megatron-core indexed
dataset -> the tiny model trained with ``configs/train/tiny.yaml`` through the real DeepSpeed loop ->
segmented generation (prefill segment by segment, then token by token) from the trained weights.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def ", "import os\nimport sys\n\n\nclass "]


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="where every artifact goes")
    p.add_argument("--config", default=str(REPO / "configs/train/tiny.yaml"))
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--max-new-tokens", type=int, default=48)


def run(args) -> int:
    import torch

    from segtrain.checkpoint import load_pretrained
    from segtrain.data.corpus import write_embedded_corpus
    from segtrain.data.indexed import preprocess
    from segtrain.data.tokenizer import train_tokenizer
    from segtrain.inference.engine import SegmentedEngine
    from segtrain.train.config import load_train_config
    from segtrain.train.loop import train

    out = Path(args.out)
    print(f"[1/5] corpus -> {write_embedded_corpus(out / 'corpus.jsonl', args.corpus_bytes)}")
    overrides = {
        "out_dir": str(out / "train"),
        "data.prefixes": [str(out / "data/corpus")],
        "data.tokenizer": str(out / "tokenizer/tokenizer.model"),
    }
    if args.steps is not None:
        overrides["steps"] = args.steps
    cfg = load_train_config(args.config, overrides, check_paths=False)
    tok = train_tokenizer([out / "corpus.jsonl"], out / "tokenizer", vocab_size=cfg.model.vocab_size)
    print(f"[2/5] tokenizer -> {tok.model_file} (vocab {tok.vocab_size})")
    stats = preprocess([out / "corpus.jsonl"], tok.model_file, out / "data/corpus", workers=2, progress=False)
    tok_s = stats["tokens_per_s"]
    print(f"[3/5] indexed data -> {out / 'data/corpus'}.{{bin,idx}}: {stats['tokens']:,} tokens ({tok_s:,.0f} tokens/s)")
    summary = train(cfg, resume="auto")
    print(
        f"[4/5] trained {summary['step']} steps -> {out / 'train'}"
        + (f": loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}" if summary["losses"] else " (already done)")
    )
    model = load_pretrained(out / "train/final").eval()
    engine = SegmentedEngine(model)
    result = engine.generate(
        [torch.tensor(tok.encode(p, bos=True)) for p in PROMPTS],
        max_new_tokens=args.max_new_tokens,
        temperature=0.8,
        top_p=0.95,
        seed=0,
        stop_tokens=(tok.eos_id,),
    )
    print(f"[5/5] segmented generation (S={model.config.segment_size}, temperature 0.8, top-p 0.95):")
    for prompt, ids in zip(PROMPTS, result.tokens):
        print(f"--- prompt {prompt!r}\n{prompt}{tok.decode(ids)}")
    return 0
