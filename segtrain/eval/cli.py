"""``segtrain eval --model DIR``: retrieval by distance, perplexity by position and prefill cost, under each mode.

    segtrain eval --model OUT/final --mode full,segmented --length 16384,32768 --ppl-data data/heldout --out runs/eval
    segtrain eval --model HF_DIR --mode segmented --segment-size 2048 --policy '{fraction: 0.25}' --tasks passkey

Prints the markdown tables; ``--out DIR`` also writes ``results.json``, ``retrieval.png`` and ``ppl.png``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from segtrain.checkpoint.open import DTYPES, SOURCES


def _lengths(text: str) -> list[int]:
    out = []
    for part in (p.strip().upper() for p in text.split(",") if p.strip()):
        try:
            out.append(int(part[:-1]) * 1024 if part.endswith("K") else int(part))
        except ValueError:
            raise ValueError(f"--length: {part!r} is not a length (e.g. 16384 or 16K)") from None
    return out


def _policy(text: str):
    from segtrain.checkpoint.hf import parse_policy_arg

    return parse_policy_arg(text)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help=f"the model: {SOURCES}")
    p.add_argument("--tag", help="a training run's checkpoint (step_*; default: the one 'latest' names)")
    p.add_argument("--mode", default="segmented", help="'full' (plain causal attention), 'segmented', or 'full,segmented'")
    p.add_argument("--segment-size", type=int, help="segmented mode: override the model's segment size")
    p.add_argument("--policy", type=_policy, help="segmented mode: override the history policy ('none', '{fraction: 0.25}', ...)")
    p.add_argument("--length", default="16384", help="input lengths in tokens, comma-separated; K suffix allowed (16K,32K)")
    p.add_argument("--tasks", default="passkey,needle,recall", help="retrieval tasks, comma-separated ('' for none)")
    p.add_argument("--task-options", default="{}",
                   help='JSON options per task, as trained (data.synthetic_options): \'{"passkey": {"digits": 2}}\'')  # fmt: skip
    p.add_argument("--samples", type=int, default=48, help="samples per task and length (spread over the distance buckets)")
    p.add_argument("--bucket-size", type=int, help="tokens per distance/position bucket (default: the segmented segment size)")
    p.add_argument("--ppl-data", help="held-out text for perplexity: an indexed prefix (PREFIX.bin/.idx) or jsonl/text files")
    p.add_argument("--ppl-sequences", type=int, default=8, help="held-out sequences per length")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill memory/time measurement")
    p.add_argument("--generate", action="store_true", help="score by real greedy generation (engine) instead of one forward")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward")
    p.add_argument("--seed", type=int, default=0, help="which synthetic samples (the same seed gives the same set)")
    p.add_argument("--tokenizer", help="a sentencepiece model or tokenizer dir (default: the one the model dir holds or names)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", help="a folder for results.json and the plots")
    p.add_argument("--label", help="a name for the model in the tables and JSON (default: the --model path)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (or lines, when stderr is not a terminal)")


def run(args) -> int:
    import torch

    from segtrain.checkpoint import ConversionError
    from segtrain.checkpoint.open import open_model, torch_dtype
    from segtrain.config import ConfigError
    from segtrain.data.synthetic import parse_task_options
    from segtrain.data.tokenizer import TokenizerError
    from segtrain.eval.evaluate import EvalPlan, evaluate
    from segtrain.eval.modes import parse_modes
    from segtrain.eval.perplexity import PerplexityDataError
    from segtrain.eval.report import markdown, plot_ppl, plot_retrieval
    from segtrain.policy import PolicyError
    from segtrain.userfiles import existing_path

    try:
        existing_path(args.model, "--model", kind="dir")
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        dtype = torch_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        modes = parse_modes(args.mode, segment_size=args.segment_size, policy=args.policy)
        plan = EvalPlan(
            modes=modes,
            lengths=_lengths(args.length),
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            samples=args.samples,
            batch_size=args.batch_size,
            seed=args.seed,
            bucket_size=args.bucket_size,
            ppl_data=args.ppl_data,
            ppl_sequences=args.ppl_sequences,
            prefill=not args.no_prefill,
            generate=args.generate,
            task_options=parse_task_options(args.task_options),
        )
        source = open_model(args.model, tag=args.tag)  # config, tokenizer, the weights' names and shapes; weights load last
        for mode in modes:  # a malformed policy or segment size fails here, naming the field, before any work
            mode.config(source.config, max(plan.lengths))
        tokenizer = source.load_tokenizer(args.tokenizer) if plan.tasks or plan.ppl_data else None
        if tokenizer is not None:
            plan.check_lengths(tokenizer)
        model = source.build(device=device, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *a, **k: print(f"segtrain eval: warning: {message}", file=sys.stderr)
            records = evaluate(model, tokenizer, plan, progress=not args.no_progress)
    except (ConfigError, ConversionError, FileNotFoundError, TokenizerError, PolicyError, PerplexityDataError, ValueError) as e:
        print(f"segtrain eval: error: {e}", file=sys.stderr)
        return 2
    label = args.label or str(args.model)
    header = {"model": label, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "config": model.config.to_dict()}
    print(markdown(records))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from segtrain.checkpoint.atomic import write_text_atomic

        write_text_atomic(out / "results.json", json.dumps({**header, "records": records}, indent=1) + "\n")
        plots = [plot_retrieval(records, out / "retrieval.png"), plot_ppl(records, out / "ppl.png")]
        print(f"[results in {out}: results.json" + "".join(f", {p.name}" for p in plots if p) + "]", file=sys.stderr)
    return 0
