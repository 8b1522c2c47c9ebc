"""``segtrain generate --model SOURCE (--prompt TEXT | --prompt-ids IDS)``: segmented generation.

``SOURCE`` is anything :func:`~segtrain.checkpoint.open.open_model` opens; text prompts use ``--tokenizer``,
else the tokenizer the source holds or its training run names."""

from __future__ import annotations

import json
import re
import sys
import time

from segtrain.checkpoint.open import DTYPES, SOURCES


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help=f"the model: {SOURCES}")
    p.add_argument("--tag", help="a training run's checkpoint (step_*; default: the one 'latest' names)")
    p.add_argument(
        "--tokenizer",
        help="a sentencepiece model or tokenizer dir (default: the one --model holds or its run names); needed for --prompt",
    )
    p.add_argument("--segment-size", type=int, help="override the model's segment size (HF dirs without a segtrain key: 4096)")
    p.add_argument(
        "--policy",
        type=_policy,
        help="override the history policy: 'all', 'sink:4+window:1024', '{first_k: 1}' (HF dirs without a segtrain key: all)",
    )
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    p.add_argument(
        "--prompt-ids", action="append", default=[], metavar="IDS", help="token ids, e.g. '1,15,27' (repeat for a batch)"
    )
    p.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS id to text prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-ids", default=None, help="comma-separated stop token ids (default: the tokenizer's EOS)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: the stored dtype (float32 on CPU for 16-bit)"
    )
    p.add_argument("--offload-history", action="store_true", help="keep 'all' heads' history in host memory")
    p.add_argument(
        "--prefill-chunk", type=int, default=None, help="query tokens per prefill block (default: min(1024, segment_size))"
    )
    p.add_argument(
        "--decode",
        default="auto",
        choices=["auto", "graph", "eager"],
        help="graph: the decoding step captured as a CUDA graph (auto: on CUDA unless --offload-history)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (at the end, no streaming)")


def _policy(text: str):
    from segtrain.checkpoint.hf import parse_policy_arg

    return parse_policy_arg(text)


def _parse_ids(text: str) -> list[int]:
    parts = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    try:
        return [int(t) for t in parts]
    except ValueError:
        raise ValueError(f"--prompt-ids: expected integers separated by commas or spaces, got {text!r}") from None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _token_id(tokenizer, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    value = value() if callable(value) else value
    return int(value) if value is not None and int(value) >= 0 else None


def _prompts(args, tokenizer, vocab: int) -> list[list[int]]:
    """``--prompt-ids``, then ``--prompt`` texts encoded; every id checked against the model's vocabulary."""
    prompts = [_parse_ids(t) for t in args.prompt_ids]
    if args.prompt and tokenizer is None:
        raise ValueError(f"--prompt: {args.model} holds no tokenizer and its run names none; pass --tokenizer")
    bos = _token_id(tokenizer, "bos_id") if tokenizer is not None else None
    for text in args.prompt:
        prompts.append(([bos] if args.add_bos and bos is not None else []) + list(tokenizer.encode(text)))
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    for ids in prompts:
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"--prompt-ids: token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
    return prompts


def _stop_ids(args, tokenizer) -> list[int]:
    if args.stop_ids is not None:
        return _parse_ids(args.stop_ids)
    eos = _token_id(tokenizer, "eos_id") if tokenizer is not None else None
    return [eos] if eos is not None else []


def _device_and_dtype(args, stored):
    """``--device`` (auto: cuda if available) and ``--dtype`` (auto: as stored, but float32 for 16-bit on the CPU)."""
    import torch

    from segtrain.checkpoint.open import torch_dtype

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch_dtype(args.dtype)
    if dtype is None and device.type == "cpu" and stored in (torch.bfloat16, torch.float16):
        dtype = torch.float32
    return device, dtype


def run(args) -> int:
    from segtrain.checkpoint.open import open_model
    from segtrain.config import ConfigError
    from segtrain.inference.engine import SegmentedEngine
    from segtrain.userfiles import existing_path

    try:
        existing_path(args.model, "--model", kind="dir")
        source = open_model(args.model, tag=args.tag, segment_size=args.segment_size, history_policy=args.policy)
        tokenizer = source.load_tokenizer(args.tokenizer)
        prompts, stop = _prompts(args, tokenizer, source.config.vocab_size), _stop_ids(args, tokenizer)
        device, dtype = _device_and_dtype(args, source.dtype)
        engine = SegmentedEngine(source.build(device=device, dtype=dtype), offload_history=args.offload_history,
                                 prefill_chunk=args.prefill_chunk, decode=args.decode)  # fmt: skip
        stream = _Stream(tokenizer) if len(prompts) == 1 and not args.json else None
        t0 = time.perf_counter()
        result = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                 seed=args.seed, stop_tokens=stop, on_tokens=stream)  # fmt: skip
        seconds = time.perf_counter() - t0
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"segtrain generate: error: {e}", file=sys.stderr)
        return 2
    if stream is not None:
        stream.finish()
    else:
        _print_results(args, prompts, result, tokenizer)
    print(_summary(prompts, result, seconds, engine.decode, device), file=sys.stderr)
    return 0


def _print_results(args, prompts, result, tokenizer) -> None:
    for prompt, tokens, reason in zip(prompts, result.tokens, result.finish_reasons):
        text = tokenizer.decode(tokens) if tokenizer is not None else None
        if args.json:
            print(json.dumps({"prompt_ids": prompt, "tokens": tokens, "text": text, "finish_reason": reason}))
        else:
            print(text if text is not None else " ".join(map(str, tokens)))


def _summary(prompts, result, seconds: float, decode: str, device) -> str:
    n_new = sum(map(len, result.tokens))
    step_ms = 1e3 * result.decode_s / result.decode_steps if result.decode_steps else 0.0
    return (
        f"[{len(prompts)} prompt(s), {sum(map(len, prompts))} prompt tokens, {n_new} new tokens in {seconds:.2f}s: "
        f"prefill {result.prefill_s:.2f}s, decoding {result.decode_tokens_per_s:.1f} tokens/s ({step_ms:.1f} ms/step, "
        f"{decode}, setup {result.setup_s:.2f}s); KV cache {_size(result.cache_bytes)} on {device}"
        + (f", {_size(result.offloaded_bytes)} offloaded" if result.offloaded_bytes else "")
        + "]"
    )


class _Stream:
    """Prints one prompt's continuation as its tokens arrive (text re-decoded each step, so spacing stays right)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def __call__(self, step_tokens: list[int | None]) -> None:
        if step_tokens[0] is None:
            return
        self.tokens.append(step_tokens[0])
        text = self.text()
        if text.startswith(self.shown):  # else a multi-byte character is not complete yet
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
            self.shown = text

    def text(self) -> str:
        return " ".join(map(str, self.tokens)) if self.tokenizer is None else self.tokenizer.decode(self.tokens)

    def finish(self) -> None:
        text = self.text()
        print(text[len(self.shown) :] if text.startswith(self.shown) else "\n" + text, flush=True)
