"""Calibrated heads against the first k heads of every layer, on a trained full-attention model (issue 20's measurement).

1. ``segtrain calibrate`` at ``--budget`` for each ``--bounded`` policy (default ``none``, the study's arm B, and
   ``sink:64+window:1024``) -> ``OUT/calibrated-<policy>/`` (model dir + calibration.json/png), timed.
2. Retrieval scored segmented (the parallel form, which equals segmented inference), teacher-forced: one forward
   per batch of samples; a sample is correct iff the argmax at every answer position is the answer token. Per
   task, per distance bucket (tokens from the queried needle to the answer; edges ``S, 2S, 4S, 8S``). Arms:
   ``full`` (every head ``all``) and, per bounded policy, ``first-k`` (the first ``round(budget * kv_heads)`` KV
   heads of every layer ``all``, the rest bounded: the same number of ``all`` heads as calibration picks),
   ``calibrated`` (the table the calibration wrote) and ``bounded`` (every head bounded).
3. ``OUT/results.json`` and a table on stdout, with the time of every phase.

On one H200 for the ~30M study model (T=16K, S=2K, 4 KV heads x 8 layers) the defaults should take about
2-3 minutes: flex compilation ~1 min, 200 calibration steps per policy at tens of ms each, 7 arms x 2 tasks x
96 samples in batches of 8. ``--steps``, ``--samples`` and ``--seq-length`` trade time for precision.

    python tools/calibration_study.py --model runs/study/A/final --out runs/calibration_study
    python tools/calibration_study.py --model M --out O --seq-length 256 --steps 2 --samples 4 --device cpu  # smoke
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from segtrain.attention import filled_slots
from segtrain.calibrate import CalibrationOptions, calibrate_dir, with_policy
from segtrain.calibrate.job import device_and_dtype, format_gates, load_model_tokenizer
from segtrain.calibrate.options import CalibrationError
from segtrain.checkpoint import load_config, load_pretrained
from segtrain.checkpoint.atomic import write_text_atomic
from segtrain.data.synthetic import make_sample, parse_task_options
from segtrain.policy import PolicyTable


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the trained full-attention model dir (e.g. the study's arm A final)")
    p.add_argument("--out", required=True, help="where calibrated model dirs and results.json go")
    p.add_argument("--tokenizer", help="default: the model dir's, else its training run's")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument(
        "--bounded", action="append", help="bounded policy to calibrate against (repeat; default none and sink:64+window:1024)"
    )
    p.add_argument(
        "--seq-length", type=int, default=16384, help="tokens per sample, calibration and scoring (default %(default)s)"
    )
    p.add_argument("--segment-size", type=int, help="default: the model's")
    p.add_argument("--steps", type=int, default=200, help="calibration steps per bounded policy (default %(default)s)")
    p.add_argument("--calibration-tasks", default="passkey,needle,recall")
    p.add_argument("--l1", type=float, default=0.05, help="gate penalty (segtrain calibrate --l1; default %(default)s)")
    p.add_argument("--lr", type=float, default=0.02, help="gate learning rate (default %(default)s)")
    p.add_argument("--eval-tasks", default="passkey,needle", help="scored tasks (passkey depths are spread evenly)")
    p.add_argument(
        "--task-options", default="{}", help='JSON per task, calibration and scoring, e.g. \'{"passkey": {"digits": 1}}\''
    )
    p.add_argument("--samples", type=int, default=96, help="scored samples per task (default %(default)s)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-seed", type=int, default=1000, help="seed of the scored samples (calibration uses seed 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--workers", type=int, default=4, help="data loader processes for calibration samples")
    p.add_argument("--progress", action="store_true", help="progress bars during calibration")
    return p.parse_args(argv)


def slug(policy: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", policy.lower()).strip("-")


def eval_samples(task: str, tok, seq_length: int, n: int, seed: int, options: dict | None = None) -> list:
    """Passkey depths spread evenly over the haystack (every distance bucket gets samples); needles as sampled."""
    options = options or {}
    if task == "passkey":
        return [make_sample(task, tok, seq_length, seed=seed, index=i, depth=(i + 0.5) / n, **options) for i in range(n)]
    return [make_sample(task, tok, seq_length, seed=seed, index=i, **options) for i in range(n)]


def distance(sample) -> int:
    """Tokens from the start of the queried needle to the first answer token."""
    needle = next(n for n in sample.needles if n.queried)
    return sample.answer_spans[0][0] - needle.start


def bucket_names(edges: list[int]) -> list[str]:
    bounds = [0, *edges]
    return [f"{lo}-{hi}" for lo, hi in zip(bounds, edges)] + [f"{edges[-1]}+"]


def bucket_of(d: int, edges: list[int]) -> int:
    return sum(d >= e for e in edges)


@torch.no_grad()
def score(model, table: PolicyTable, samples: list, edges: list[int], batch: int, device) -> dict:
    """``{bucket: [correct, total]}``, teacher-forced with the model's slots set to ``table``."""
    names = bucket_names(edges)
    counts = {name: [0, 0] for name in names}
    with filled_slots(model, lambda o: with_policy(o, table[o.layer])):
        for i in range(0, len(samples), batch):
            chunk = samples[i : i + batch]
            answers = [[p for a, b in s.answer_spans for p in range(a, b)] for s in chunk]
            n = max(map(len, answers))  # rows with fewer answer tokens repeat their last position
            index = torch.tensor([[p - 1 for p in pos] + [pos[-1] - 1] * (n - len(pos)) for pos in answers], device=device)
            ids = torch.tensor([s.input_ids for s in chunk], device=device)
            predicted = model(ids, logits_positions=index).argmax(-1).tolist()
            for s, pos, row in zip(chunk, answers, predicted):
                c = counts[names[bucket_of(distance(s), edges)]]
                c[0] += int(row[: len(pos)] == [s.input_ids[p] for p in pos])
                c[1] += 1
    return {k: v for k, v in counts.items() if v[1]}


def table_text(results: dict, tasks: list[str]) -> str:
    lines = []
    for task in tasks:
        first = results["arms"]["full"]["accuracy"][task]  # every arm scores the same samples
        buckets = list(first)
        lines.append(f"\n{task}: accuracy by distance (tokens from the needle to the answer)")
        lines.append(f"| arm | {' | '.join(f'{b} (n={first[b][1]})' for b in buckets)} | all |")
        lines.append("|" + " --- |" * (len(buckets) + 2))
        for arm, r in results["arms"].items():
            acc = r["accuracy"][task]
            total = [sum(acc[b][i] for b in buckets) for i in (0, 1)]
            cells = [f"{acc[b][0] / acc[b][1]:.2f}" for b in buckets] + [f"{total[0] / total[1]:.2f}"]
            lines.append(f"| {arm} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    bounded = args.bounded or ["none", "sink:64+window:1024"]
    task_options = parse_task_options(args.task_options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results = {
        "model": args.model,
        "budget": args.budget,
        "seq_length": args.seq_length,
        "task_options": task_options,
        "timing": {},
        "calibration": {},
        "arms": {},
    }
    options = dict(budget=args.budget, seq_length=args.seq_length, segment_size=args.segment_size, steps=args.steps,
                   l1=args.l1, lr=args.lr, tasks=tuple(args.calibration_tasks.split(",")))  # fmt: skip
    options["task_options"] = {t: o for t, o in task_options.items() if t in options["tasks"]}

    tables = {}
    try:
        for policy in bounded:
            t0 = time.perf_counter()
            target = out / f"calibrated-{slug(policy)}"
            record = calibrate_dir(args.model, target, CalibrationOptions(bounded=policy, **options), tokenizer=args.tokenizer,
                                   device=args.device, dtype=args.dtype, workers=args.workers, overwrite=True,
                                   progress=args.progress)  # fmt: skip
            wall = time.perf_counter() - t0
            print(
                f"[calibrate {policy}] {record['steps']} steps: {record['seconds']:.1f}s learning (first step "
                f"{record['first_step_seconds']}s), {wall:.1f}s in all"
            )
            print(format_gates(record), flush=True)
            kept = ("seconds", "seconds_per_step", "first_step_seconds", "steps", "all_heads", "budget_edge", "gates")
            results["calibration"][policy] = {
                "dir": str(target),
                "seconds_total": round(wall, 3),
                **{k: record[k] for k in kept},
                "distill_first_last": [record["distill"][0], record["distill"][-1]],
            }
            tables[policy] = load_config(target).policy_table()  # what the written dir runs
    except CalibrationError as e:
        print(f"calibration_study: error: {e}", file=sys.stderr)
        return 2
    results["timing"]["calibration_s"] = round(time.perf_counter() - t_start, 3)

    t0 = time.perf_counter()
    config = load_config(args.model, segment_size=args.segment_size)
    device, dtype = device_and_dtype(args.device, args.dtype)
    model = load_pretrained(args.model, device=device, dtype=dtype, segment_size=args.segment_size)
    tok = load_model_tokenizer(Path(args.model), args.tokenizer, config.vocab_size)
    tasks = args.eval_tasks.split(",")
    samples = {t: eval_samples(t, tok, args.seq_length, args.samples, args.eval_seed, task_options.get(t)) for t in tasks}
    results["timing"]["eval_setup_s"] = round(time.perf_counter() - t0, 3)

    L, H, S = config.num_layers, config.num_kv_heads, config.segment_size
    edges = [e for e in (S, 2 * S, 4 * S, 8 * S) if e < args.seq_length] or [S]
    arms = {"full": PolicyTable.uniform(L, H, "all")}
    for policy in bounded:
        arms[f"first-k/{policy}"] = PolicyTable.from_spec({"fraction": args.budget, "rest": policy}, L, H)
        arms[f"calibrated/{policy}"] = tables[policy]
        arms[f"bounded/{policy}"] = PolicyTable.uniform(L, H, policy)
    for arm, table in arms.items():
        t0 = time.perf_counter()
        accuracy = {t: score(model, table, samples[t], edges, args.eval_batch, device) for t in tasks}
        seconds = time.perf_counter() - t0
        n_all = sum(p.all for row in table.layers for p in row)
        results["arms"][arm] = {"all_heads": n_all, "policy": table.to_spec(), "accuracy": accuracy, "seconds": round(seconds, 3)}
        print(f"[score {arm}] {n_all} all heads, {seconds:.1f}s", flush=True)
        write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")  # what is done so far
    results["timing"]["total_s"] = round(time.perf_counter() - t_start, 3)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    print(table_text(results, tasks))
    print(f"\ntiming: {results['timing']}; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
