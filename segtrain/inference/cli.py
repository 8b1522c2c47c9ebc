"""``segtrain generate --model DIR (--prompt TEXT --tokenizer PATH | --prompt-ids IDS)``: segmented generation."""

from __future__ import annotations

import json
import re
import sys
import time

DTYPES = ("float32", "bfloat16", "float16", "float64")  # torch dtype names; torch is imported when the command runs


def add_arguments(p) -> None:
    p.add_argument(
        "--model", required=True, help="a checkpoint directory (config.json + model.safetensors) or an HF Llama directory"
    )
    p.add_argument(
        "--tokenizer",
        help="a sentencepiece model (default: the one in --model, if any); needed for --prompt, optional with --prompt-ids",
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


def _carries_tokenizer(model: str) -> bool:
    """A model directory with tokenizer files (``segtrain train`` exports its tokenizer into ``OUT/final``)."""
    from pathlib import Path

    return any((Path(model) / name).is_file() for name in ("tokenizer.model", "tokenizer.json"))


def _token_id(tokenizer, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    value = value() if callable(value) else value
    return int(value) if value is not None and int(value) >= 0 else None


def run(args) -> int:
    import torch

    from segtrain.checkpoint import load_pretrained
    from segtrain.config import ConfigError
    from segtrain.data.tokenizer import load_tokenizer
    from segtrain.inference.engine import SegmentedEngine
    from segtrain.userfiles import existing_path

    try:
        existing_path(args.model, "--model", kind="dir")
        if args.tokenizer:
            existing_path(args.tokenizer, "--tokenizer")
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        if tokenizer is None and (args.prompt or _carries_tokenizer(args.model)):  # the one a model directory carries
            tokenizer = load_tokenizer(args.model)
        prompts = [_parse_ids(t) for t in args.prompt_ids]
        bos = _token_id(tokenizer, "bos_id") if tokenizer is not None else None
        for text in args.prompt:
            ids = list(tokenizer.encode(text))
            prompts.append(([bos] if args.add_bos and bos is not None else []) + ids)
        if not prompts:
            raise ValueError("give at least one --prompt or --prompt-ids")
        if args.stop_ids is not None:
            stop = _parse_ids(args.stop_ids)
        else:
            eos = _token_id(tokenizer, "eos_id") if tokenizer is not None else None
            stop = [eos] if eos is not None else []
        if args.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(args.device)
        model = load_pretrained(
            args.model,
            device=device,
            segment_size=getattr(args, "segment_size", None),
            history_policy=getattr(args, "policy", None),
        )
        vocab = model.config.vocab_size
        for ids in prompts:
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"--prompt-ids: token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        dtype = getattr(torch, args.dtype) if args.dtype in DTYPES else None
        stored = next(model.parameters()).dtype
        if dtype is None and device.type == "cpu" and stored in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        if dtype is not None:
            model = model.to(dtype=dtype)
        engine = SegmentedEngine(
            model, offload_history=args.offload_history, prefill_chunk=args.prefill_chunk, decode=args.decode
        )
        stream = _Stream(tokenizer) if len(prompts) == 1 and not args.json else None
        t0 = time.perf_counter()
        result = engine.generate(
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop_tokens=stop,
            on_tokens=stream,
        )
        seconds = time.perf_counter() - t0
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"segtrain generate: error: {e}", file=sys.stderr)
        return 2
    if stream is not None:
        stream.finish()
    else:
        for prompt, tokens, reason in zip(prompts, result.tokens, result.finish_reasons):
            text = tokenizer.decode(tokens) if tokenizer is not None else None
            if args.json:
                print(json.dumps({"prompt_ids": prompt, "tokens": tokens, "text": text, "finish_reason": reason}))
            else:
                print(text if text is not None else " ".join(map(str, tokens)))
    n_new = sum(map(len, result.tokens))
    step_ms = 1e3 * result.decode_s / result.decode_steps if result.decode_steps else 0.0
    print(
        f"[{len(prompts)} prompt(s), {sum(map(len, prompts))} prompt tokens, {n_new} new tokens in {seconds:.2f}s: "
        f"prefill {result.prefill_s:.2f}s, decoding {result.decode_tokens_per_s:.1f} tokens/s ({step_ms:.1f} ms/step, "
        f"{engine.decode}, setup {result.setup_s:.2f}s); KV cache {_size(result.cache_bytes)} on {device}"
        + (f", {_size(result.offloaded_bytes)} offloaded" if result.offloaded_bytes else "")
        + "]",
        file=sys.stderr,
    )
    return 0


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
