"""Does a training recipe teach a small model to retrieve at all? A fast probe before a long study.

The consistency study (``tools/study_consistency.py``) compares arms only where some arm retrieves. This
probe trains several recipe variants side by side on one GPU (one process each, a plain AdamW loop, no
DeepSpeed), at one short length with full causal attention, on the synthetic retrieval tasks mixed with
natural text (each row's loss averaged over its own counted tokens, then over rows), and reports the
answer-token accuracy (teacher-forced argmax) and the exact-answer rate of each task on held-out samples
as training goes. A variant is a JSON object overriding the defaults
(``--variants '[{"name": "base"}, {"name": "init05", "init": 0.05}]'``); ``--save NAME`` keeps that
variant's final weights as a model dir (``segtrain generate`` / the study's ``--init-model``).

    python tools/probe_retrieval.py --data .study_data --out OUT --variants '[{"name":"a"},{"name":"b","lr":3e-3}]'

``OUT``: ``probe.json`` (every evaluation), ``probe.png`` (exact rate vs step), a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULTS = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "layers": 8,
    "heads": 8,
    "kv_heads": 4,
    "init": 0.02,
    "lr": 1.5e-3,
    "warmup": 50,
    "seq_length": 2048,
    "batch": 8,
    "steps": 1000,
    "tasks": "passkey+needle+recall",
    "loss_on": "answers",
    "text_fraction": 0.5,
    "options": {"recall": {"num_pairs": 16, "num_queries": 16}},
    "seed": 0,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder made by tools/study_consistency.py --prepare-data")
    p.add_argument("--out", required=True, help="probe.json, probe.png, saved model dirs")
    p.add_argument("--work", default="", help="job files and per-variant logs (default: OUT/work)")
    p.add_argument("--variants", default='[{"name": "base"}]', help="JSON list of objects overriding the defaults")
    p.add_argument("--steps", type=int, help="steps of every variant (default: each variant's own, 1000)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=24, help="held-out samples per task")
    p.add_argument("--save", default="", help="comma-separated variant names whose final weights become model dirs in OUT")
    p.add_argument("--budget-s", type=float, default=3600.0, help="stop every variant after this many seconds")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def variant_settings(raw: dict, steps: int | None) -> dict:
    unknown = set(raw) - set(DEFAULTS) - {"name"}
    if unknown:
        raise SystemExit(f"--variants: unknown field {sorted(unknown)[0]!r}; fields: {sorted(DEFAULTS)}")
    if "name" not in raw:
        raise SystemExit("--variants: every variant needs a 'name'")
    v = {**DEFAULTS, **raw}
    if steps:
        v["steps"] = steps
    return v


def run_worker(job_file: str) -> int:
    """Train one variant; append one JSON line per evaluation to its log."""
    import numpy as np
    import torch

    from segtrain.checkpoint.portable import save_pretrained
    from segtrain.config import ModelConfig
    from segtrain.data.indexed import token_dtype
    from segtrain.data.synthetic import SyntheticDataset
    from segtrain.data.tokenizer import load_tokenizer
    from segtrain.models.llama import LlamaForCausalLM

    job = json.loads(Path(job_file).read_text())
    v, data, device = job["variant"], Path(job["data"]), job["device"]
    torch.manual_seed(v["seed"])
    tok = load_tokenizer(data / "tokenizer" / "tokenizer.model")
    vocab = json.loads((data / "data.json").read_text())["vocab"]
    T = v["seq_length"]
    config = ModelConfig(
        vocab_size=vocab, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=v["layers"],
        num_heads=v["heads"], num_kv_heads=v["kv_heads"], rope_theta=500000.0, tie_word_embeddings=True,
        max_position_embeddings=T, segment_size=T, history_policy="all", initializer_range=v["init"],
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device)
    tasks = v["tasks"].split("+")
    options = dict(v["options"])
    train = SyntheticDataset(tasks, tok, T, 10**8, seed=v["seed"], loss_on=v["loss_on"], **options)
    text = np.memmap(data / "train.bin", dtype=token_dtype(vocab), mode="r")
    rng = np.random.default_rng(v["seed"])
    held = {
        t: SyntheticDataset(t, tok, T, v["eval_samples"], seed=10_000 + v["seed"], **{k: o for k, o in options.items() if k == t})
        for t in tasks
    }
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=v["lr"],
                            betas=(0.9, 0.95), fused=device == "cuda")  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights and activations, TF32 matmuls: small models, no scaler
    torch.backends.cudnn.allow_tf32 = True
    n_text = round(v["batch"] * v["text_fraction"])

    def batch(step: int) -> dict:
        rows = [train[step * v["batch"] + j] for j in range(v["batch"] - n_text)]
        for _ in range(n_text):
            start = int(rng.integers(0, len(text) - T - 1))
            ids = torch.from_numpy(text[start : start + T + 1].astype(np.int64))
            rows.append({"tokens": ids[:-1], "labels": ids[1:], "loss_mask": torch.ones(T)})
        return {k: torch.stack([r[k] for r in rows]).to(device) for k in ("tokens", "labels", "loss_mask")}

    @torch.no_grad()
    def evaluate(step: int, loss: float) -> dict:
        model.eval()
        record = {"variant": v["name"], "step": step, "loss": loss}
        for task, ds in held.items():
            hits = total = exact = 0
            for i in range(0, len(ds), 8):
                rows = [ds[j] for j in range(i, min(i + 8, len(ds)))]
                ids = torch.stack([r["tokens"] for r in rows]).to(device)
                labels = torch.stack([r["labels"] for r in rows]).to(device)
                mask = torch.stack([r["loss_mask"] for r in rows]).to(device) > 0
                pred = model(ids).argmax(-1)
                ok = (pred == labels) | ~mask
                hits += int((ok & mask).sum())
                total += int(mask.sum())
                exact += int(ok.all(dim=1).sum())
            record[task] = {"token_accuracy": hits / max(total, 1), "exact": exact / len(ds)}
        model.train()
        with open(job["log"], "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    t0, loss_value = time.time(), float("nan")
    for step in range(v["steps"]):
        warm = min(1.0, (step + 1) / max(1, v["warmup"]))
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / v["steps"]))
        for g in opt.param_groups:
            g["lr"] = v["lr"] * warm * cosine
        b = batch(step)
        # each row's own mean, then the mean of rows: a text row's 2K tokens do not drown 5 answer tokens
        per_token = model(b["tokens"], labels=b["labels"], reduction="none")
        loss = ((per_token * b["loss_mask"]).sum(1) / b["loss_mask"].sum(1).clamp(min=1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % job["eval_every"] == 0 and step:
            loss_value = float(loss.detach())
            r = evaluate(step, loss_value)
            print(
                v["name"],
                step,
                f"{time.time() - t0:.0f}s",
                {t: (round(r[t]["exact"], 2), round(r[t]["token_accuracy"], 2)) for t in tasks},
                flush=True,
            )
    evaluate(v["steps"], float(loss.detach()))
    if job.get("save"):
        save_pretrained(model, config, job["save"], tokenizer=data / "tokenizer" / "tokenizer.model")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    variants = [variant_settings(raw, args.steps) for raw in json.loads(args.variants)]
    save = {s for s in args.save.split(",") if s}
    procs, logs = [], {}
    for v in variants:
        logs[v["name"]] = work / f"{v['name']}.jsonl"
        logs[v["name"]].unlink(missing_ok=True)
        job = {"variant": {**v, "eval_samples": args.eval_samples}, "data": str(Path(args.data).resolve()), "device": args.device,
               "log": str(logs[v["name"]]), "eval_every": args.eval_every,
               "save": str(out / v["name"]) if v["name"] in save else None}  # fmt: skip
        job_file = work / f"{v['name']}.job.json"
        job_file.write_text(json.dumps(job))
        env = {**os.environ, "OMP_NUM_THREADS": "1" if args.device == "cpu" else "4", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, __file__, "--data", args.data, "--out", args.out, "--worker", str(job_file)]
        procs.append(subprocess.Popen(cmd, env=env))
    deadline = time.monotonic() + args.budget_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(1)
    for p in procs:  # out of budget: stop; the table shows every evaluation made so far
        if p.poll() is None:
            p.terminate()
    codes = [p.wait() for p in procs]
    records = [
        json.loads(line) for v in variants if logs[v["name"]].is_file() for line in logs[v["name"]].read_text().splitlines()
    ]
    (out / "probe.json").write_text(json.dumps({"variants": variants, "records": records}, indent=1) + "\n")
    tasks = sorted({t for v in variants for t in v["tasks"].split("+")})
    print("\n| variant | step | loss | " + " | ".join(f"{t} exact (token acc)" for t in tasks) + " |")
    print("| --- " * (3 + len(tasks)) + "|")
    for r in records:
        cells = [f"{100 * r[t]['exact']:.0f}% ({100 * r[t]['token_accuracy']:.0f}%)" if t in r else "" for t in tasks]
        print(f"| {r['variant']} | {r['step']} | {r['loss']:.3f} | " + " | ".join(cells) + " |")
    from segtrain.plotting import pyplot

    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for v in variants:
                rs = [r for r in records if r["variant"] == v["name"] and task in r]
                ax.plot([r["step"] for r in rs], [r[task]["exact"] for r in rs], marker="o", label=v["name"])
            ax.set(title=task, xlabel="step", ylabel="exact answers", ylim=(-0.02, 1.02))
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "probe.png", dpi=110)
    return max(0, *codes)  # a variant stopped by the budget (-15) is not a failure


if __name__ == "__main__":
    sys.exit(main())
