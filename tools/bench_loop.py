"""What the training loop adds to the bare step, on one GPU, in one run.

    python tools/bench_loop.py --config configs/train/llama3.2-1b-32k.yaml --steps 6 --out $OUT/loop \\
        --set 'data.prefixes=[.study_data/train]' --set data.tokenizer=.study_data/tokenizer/tokenizer.model

The loop is ``segtrain train`` on the config (DeepSpeed's engine and optimizer, the data pipeline, logging), run as
its own process and timed by its own metrics: ``tokens_per_s`` and the phases of each step (``time_data_s``,
``time_step_s``, ``time_host_s``, ``time_save_s``; segtrain/train/metrics.py). The baseline, run next in this process,
is ``tools/bench_train.py``'s step on the same model, assembled the same way (compile, fused loss, activation options
as the config resolves them on this device): random tokens, batch 1, forward, backward and torch's fused AdamW.

tokens/s compare per token: a loop step is micro_batch x grad_accum sequences and one optimizer step, a bench step one
sequence and one optimizer step. Medians over the steps after ``--warmup`` (compilation). Printed as a table; JSON in
OUT/bench_loop.json and a bar plot of the time per sequence in OUT/bench_loop.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

PHASES = ("data", "step", "host", "save")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/train/llama3.2-1b-32k.yaml", help="a train config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as segtrain train's --set")
    p.add_argument("--steps", type=int, default=6, help="loop steps measured, after --warmup")
    p.add_argument("--warmup", type=int, default=2, help="loop and bench steps not measured (compilation)")
    p.add_argument("--bench-steps", type=int, default=5, help="bench steps measured, after --warmup")
    p.add_argument("--out", type=Path, default=Path("runs/bench_loop"))
    return p.parse_args(argv)


def run_loop(args, work: Path) -> list[dict]:
    """``segtrain train`` for warmup + steps steps, every step logged, no checkpoint before the last; its metrics rows."""
    fixed = [f"steps={args.warmup + args.steps}", "log_every=1", f"save_every={10**9}", "export_final=false",
             f"out_dir={work}"]  # fmt: skip
    cmd = [sys.executable, "-m", "segtrain", "train", "--config", args.config, "--no-progress", "--overwrite"]
    for pair in [*args.set, *fixed]:
        cmd += ["--set", pair]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (args.out / "loop.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"bench_loop: segtrain train failed (exit {done.returncode}); see {args.out / 'loop.log'}")
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def loop_summary(rows: list[dict], warmup: int, sequences_per_step: int) -> dict:
    """Medians of the logged steps after ``warmup``: tokens/s, and each phase per sequence (seconds)."""
    kept = rows[warmup:] or rows
    out = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in kept), "steps": len(kept)}
    for phase in PHASES:
        out[f"{phase}_s_per_sequence"] = statistics.median(r[f"time_{phase}_s"] for r in kept) / sequences_per_step
    out["peak_memory_gib"] = max((r.get("peak_memory_gib") or 0.0) for r in rows) or None
    return out


def run_bench(args, cfg) -> dict:
    """bench_train's step on the config's model, built and assembled as the portable recipe does on this device."""
    import torch
    from bench_train import bench

    from segtrain.train.recipes.portable import build_model, fuses_loss

    device = torch.device("cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = build_model(cfg, device, torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32)
    T = cfg.data.seq_length
    r = bench(model, T, args.bench_steps, args.warmup, cfg.model.vocab_size, base_bytes=base,
              fused_loss=fuses_loss(cfg, device))  # fmt: skip
    return {"tokens_per_s": T / r["step_s"], "step_s_per_sequence": r["step_s"], "peak_memory_gib": r["peak_gib"]}


def table(result: dict) -> list[str]:
    gpu, bench, loop = result["gpu"], result["bench"], result["loop"]
    seq = bench["step_s_per_sequence"]
    lines = [f"{gpu}; T={result['seq_length']}, {result['sequences_per_step']} sequences per loop step",
             "", "| run | tokens/s | vs bench | s per sequence | peak GiB |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, r in (("bench: model step + fused AdamW", bench), ("loop: segtrain train", loop)):
        per_seq = result["seq_length"] / r["tokens_per_s"]
        peak = "-" if not r.get("peak_memory_gib") else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / bench['tokens_per_s']:.3f} | "
                     f"{per_seq:.4f} | {peak} |")  # fmt: skip
    for phase in PHASES:
        s = loop[f"{phase}_s_per_sequence"]
        lines.append(f"| loop: {phase} | | | {s:.4f} ({s / seq:.1%} of the bench's) | |")
    return lines


def plot(result: dict, path: Path) -> None:
    from segtrain.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(["bench"], [result["bench"]["step_s_per_sequence"]], color="tab:gray", label="bench step")
    left = 0.0
    for phase, color in zip(PHASES, ("tab:orange", "tab:blue", "tab:green", "tab:red")):
        width = result["loop"][f"{phase}_s_per_sequence"]
        ax.barh(["loop"], [width], left=left, color=color, label=f"loop: {phase}")
        left += width
    ax.set_xlabel(f"seconds per sequence of {result['seq_length']} tokens ({result['gpu']})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from segtrain.errors import UserError
    from segtrain.train.cli import parse_overrides
    from segtrain.train.config import load_train_config

    for flag, value, least in (("--steps", args.steps, 1), ("--bench-steps", args.bench_steps, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            raise SystemExit(f"bench_loop: {flag} must be at least {least}, got {value}")
    try:
        cfg = load_train_config(args.config, parse_overrides(args.set))
    except UserError as e:  # the config or a --set names the field; the same line segtrain train would print
        raise SystemExit(f"bench_loop: error: {e}") from None
    if not torch.cuda.is_available():
        raise SystemExit("bench_loop: needs a CUDA GPU (it compares GPU step times)")
    args.out.mkdir(parents=True, exist_ok=True)
    sequences = cfg.micro_batch_size * cfg.grad_accum
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as work:
        rows = run_loop(args, Path(work) / "run")
    result = {"gpu": torch.cuda.get_device_name(), "config": args.config, "set": args.set,
              "seq_length": cfg.data.seq_length, "sequences_per_step": sequences,
              "loop": loop_summary(rows, args.warmup, sequences), "loop_rows": rows}  # fmt: skip
    result["bench"] = run_bench(args, cfg)
    from segtrain.checkpoint.atomic import write_text_atomic

    write_text_atomic(args.out / "bench_loop.json", json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "bench_loop.png")
    print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
