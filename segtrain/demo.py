"""``segtrain demo``: the mechanism at work, on CPU, in well under a minute (35 s on two idle cores).

A tokenizer trained on the Python standard library's text (and the text as an indexed dataset, which
``configs/train/tiny.yaml`` trains on), then the tiny model (2 layers; per layer one
KV head reads all history, the other none) trained with ``configs/train/demo.yaml`` through the real
DeepSpeed loop on the synthetic pass-key task: a one-digit key hidden 3 to 4 segments before the
question, so only attention to detached history can reach it. Then segmented generation answers
held-out samples, once as trained and once with every head's history turned off (the ablation that
shows where the answer comes from), with the KV cache each needs, and the next commands to try.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="where every artifact goes")
    p.add_argument("--config", default=str(REPO / "configs/train/demo.yaml"), help="the training config (a synthetic task)")
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--corpus-bytes", type=int, default=300_000, help="text for the tokenizer")
    p.add_argument("--samples", type=int, default=100, help="held-out samples to evaluate")


def _same_task(out: Path, cfg) -> bool:
    """Whether ``out`` holds no run, or a run of this model and data (a changed ``steps`` continues it)."""
    from segtrain.checkpoint.run import TRAINER_STATE, find_checkpoint

    try:
        saved = json.loads((out / "checkpoints" / find_checkpoint(out / "checkpoints", warn=lambda _: None) / TRAINER_STATE)
                           .read_text())["config"]  # fmt: skip
    except Exception:  # no run yet (or nothing readable: the demo starts over)
        return not out.exists() or not any(out.iterdir())
    current = cfg.to_dict()
    return all(saved.get(key) == current[key] for key in ("model", "data"))


def _accuracy(model, samples, batch: int = 50) -> tuple[float, list[list[int]], int]:
    """Greedy segmented generation of each sample's answer: (exact-match rate, generated ids, KV cache bytes per sequence)."""
    from segtrain.inference.engine import SegmentedEngine

    engine = SegmentedEngine(model)
    generated, cache = [], 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        n_answer = chunk[0].answer_spans[0][1] - chunk[0].answer_spans[0][0]
        result = engine.generate([s.prompt_ids for s in chunk], max_new_tokens=n_answer)
        generated += result.tokens
        cache = result.cache_bytes // len(chunk)
    hits = [g == s.input_ids[slice(*s.answer_spans[0])] for g, s in zip(generated, samples)]
    return sum(hits) / len(samples), generated, cache


def run(args) -> int:
    from segtrain.checkpoint import load_pretrained
    from segtrain.config import ConfigError
    from segtrain.data.corpus import write_embedded_corpus
    from segtrain.data.indexed import preprocess
    from segtrain.data.synthetic import PartEncoder, make_sample
    from segtrain.data.tokenizer import train_tokenizer
    from segtrain.train.config import load_train_config
    from segtrain.train.loop import train
    from segtrain.train.signals import exit_status

    out = Path(args.out)
    overrides = {"out_dir": str(out / "train"), "data.tokenizer": str(out / "tokenizer/tokenizer.model")}
    if args.steps is not None:
        overrides["steps"] = args.steps
    cfg = load_train_config(args.config, overrides, check_paths=False)
    if cfg.data.synthetic is None:
        raise ConfigError(f"data.synthetic: the demo trains on a synthetic task and evaluates it; {args.config} sets none")
    corpus = write_embedded_corpus(out / "corpus.jsonl", args.corpus_bytes)
    tok = train_tokenizer([corpus], out / "tokenizer", vocab_size=cfg.model.vocab_size)
    stats = preprocess([corpus], tok.model_file, out / "data/corpus", workers=2, progress=False)
    print(
        f"[1/4] tokenizer -> {tok.model_file} (vocab {tok.vocab_size}, trained on the Python standard library's text); "
        f"indexed data -> {out / 'data/corpus'}.{{bin,idx}} ({stats['tokens']:,} tokens, for configs/train/tiny.yaml)"
    )

    S, T, task = cfg.model.segment_size, cfg.data.seq_length, cfg.data.synthetic
    held_out = [make_sample(task, PartEncoder(tok), T + 1, seed=cfg.seed + 1, index=i, **cfg.data.synthetic_options)
                for i in range(args.samples)]  # fmt: skip
    back = []  # segments between the key's last copy and the query that must produce it (>= 2: in history)
    for s in held_out:
        start, end = s.answer_spans[0]
        key = max(i for n in s.needles for i in range(n.start, n.end) if s.input_ids[i] == s.input_ids[end - 1])
        back.append((end - 2) // S - key // S)
    table = cfg.model.policy_table()
    print(
        f"[2/4] training: {cfg.model.num_layers} layers, segments of {S} tokens, {T} tokens per sample; history per "
        f"layer and KV head: {table.to_spec()}\n      task: {task} {cfg.data.synthetic_options or ''}: the key sits "
        f"{min(back)} to {max(back)} segments before the answer, beyond the previous segment: only history reaches it"
    )
    same = _same_task(out / "train", cfg)
    if not same:
        print(f"      {out / 'train'} holds a run of another model or task: starting over")
    summary = train(cfg, resume="auto" if same else "none", overwrite=not same)
    if summary["stopped_by"] is not None:
        print(f"segtrain demo: stopped by {summary['stopped_by']}; the same command continues it", file=sys.stderr)
        return exit_status(getattr(signal, summary["stopped_by"], signal.SIGTERM))
    losses = summary["losses"]
    loss = f": loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else " (already done)"
    print(f"      trained {summary['step']} steps -> {out / 'train'}{loss}")

    final = out / "train/final"
    acc, generated, cache = _accuracy(load_pretrained(final), held_out)
    blind, _, blind_cache = _accuracy(load_pretrained(final, history_policy="none"), held_out)
    kv_full = 2 * cfg.model.num_layers * cfg.model.num_kv_heads * (T + 1) * cfg.model.head_dim * 4
    print(
        f"[3/4] {len(held_out)} held-out samples, segmented prefill + greedy decoding:\n"
        f"      as trained:               {acc:6.1%} exact (KV cache {cache / 1024:.1f} KiB per sequence; "
        f"full attention keeps {kv_full / 1024:.1f} KiB)\n"
        f"      every head's history off: {blind:6.1%} exact (KV cache {blind_cache / 1024:.1f} KiB): "
        f"without history the key is out of reach (chance is about {1 / 10 ** len(held_out[0].answer):.0%})"
    )
    example = held_out[0]
    (out / "prompt.txt").write_text(example.prompt)
    print(f"[4/4] example: ...{example.prompt[-60:]!r} -> {tok.decode(generated[0])!r} (answer {example.answer!r})")
    print(
        "next:\n"
        f'  segtrain generate --model {final} --add-bos --max-new-tokens 2 --prompt "$(cat {out / "prompt.txt"})"\n'
        f"  segtrain convert --to hf {final} {out / 'hf'}        # transformers runs it with trust_remote_code=True\n"
        f"  segtrain train --config {args.config} --set data.tokenizer={tok.model_file} --set out_dir={out / 'train'} "
        f"--set steps={cfg.steps + 200} --resume auto   # train on\n"
        f"  {REPO / 'launch/train.sh'} --launcher torchrun --nproc 2 {REPO / 'configs/train/tiny.yaml'} "
        f"--set data.prefixes=[{out / 'data/corpus'}] --set data.tokenizer={tok.model_file}   # language modelling, 2 processes"
    )
    return 0
