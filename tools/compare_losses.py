"""Two training runs' loss curves side by side: do the speed levers train the same as the plain path?

    python tools/compare_losses.py runs/plain runs/levers --labels plain levers --out $OUT/losses

Reads each run's ``metrics.jsonl`` (``segtrain train`` writes one line per logged step), prints a
table (loss at a few steps, the largest relative difference over the common steps, tokens/s) and
writes ``losses.json`` and ``losses.png`` under ``--out``. Exit status 1 when the largest relative
difference passes ``--tolerance`` (bf16 training: about 1e-2 over 50 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from segtrain.checkpoint.atomic import write_text_atomic
from segtrain.plotting import pyplot


def read_metrics(run: str) -> dict[int, dict]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"{run}: no metrics.jsonl (is it a segtrain train out_dir?)")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def compare(runs: list[dict[int, dict]]) -> dict:
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    if not steps:
        sys.exit("the runs share no logged step")
    base = runs[0]
    rel = {s: max(abs(r[s]["loss"] - base[s]["loss"]) / abs(base[s]["loss"]) for r in runs[1:]) for s in steps}
    tokens = [sorted(r[s].get("tokens_per_s", 0.0) for s in steps[len(steps) // 2 :]) for r in runs]
    return dict(
        steps=steps,
        losses=[[r[s]["loss"] for s in steps] for r in runs],
        max_rel_diff=max(rel.values()),
        max_rel_diff_step=max(rel, key=rel.get),
        final_rel_diff=rel[steps[-1]],
        median_tokens_per_s=[t[len(t) // 2] for t in tokens],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="segtrain train out_dirs; the first is the reference")
    ap.add_argument("--labels", nargs="*", help="one per run (default: the folder names)")
    ap.add_argument("--out", default="runs/compare_losses")
    ap.add_argument("--tolerance", type=float, default=1e-2, help="largest relative loss difference allowed")
    args = ap.parse_args()
    if len(args.runs) < 2:
        sys.exit("give at least two runs")
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        sys.exit(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    result = dict(runs=args.runs, labels=labels, tolerance=args.tolerance, **compare([read_metrics(r) for r in args.runs]))
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, "losses.json"), json.dumps(result, indent=1))
    plt = pyplot()
    if plt is None:
        print("(no matplotlib: no plot)")
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, losses in zip(labels, result["losses"]):
            ax.plot(result["steps"], losses, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "losses.png"), dpi=120)
    steps = result["steps"]
    shown = sorted({steps[0], steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]})
    print("| run | " + " | ".join(f"loss @{s}" for s in shown) + " | median tokens/s |")
    print("|---|" + "---|" * (len(shown) + 1))
    for label, losses, tps in zip(labels, result["losses"], result["median_tokens_per_s"]):
        print(f"| {label} | " + " | ".join(f"{losses[steps.index(s)]:.4f}" for s in shown) + f" | {tps:,.0f} |")
    ok = result["max_rel_diff"] <= args.tolerance
    print(
        f"\nlargest relative difference {result['max_rel_diff']:.2e} at step {result['max_rel_diff_step']}, "
        f"final {result['final_rel_diff']:.2e}: {'within' if ok else 'OUTSIDE'} {args.tolerance:g}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
