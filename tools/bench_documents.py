"""Cost of document mode: packed documents attended alone (``model.documents``) against one stream, same tokens.

    python tools/bench_documents.py --out $OUT/bench_documents                      # 1B shape, T=32K, flex (+ flash)
    python tools/bench_documents.py --backends flex flash te --length 32768 --mean 4096 --out $OUT/bd
    python tools/bench_documents.py --tiny --out /tmp/bd                            # the script on CPU (a test runs it)

Each row is one sequence of ``--length`` tokens packed from a seeded long-tailed mix of document lengths (lognormal,
mean ``--mean``, clipped to [64, length]); ``stream`` runs it as one stream (positions 0..T-1, as without document
mode), ``documents`` with positions restarting per document. One GPU, batch 1, bf16 weights, every decoder layer
under activation checkpointing (``--no-ac``: none); forward + backward of the loss (no optimizer step): median
time over ``--steps`` after ``--warmup``, tokens/s, peak memory above the weights (``max_memory_allocated``). The
``pairs`` column is the visible (query, key) pairs relative to one stream: what skipping fully masked blocks can
save. Writes OUT/bench_documents.json after every row (a crash keeps what ran) and OUT/bench_documents.png.
``--snapshot``: one more step per row under torch's memory history; the row then names what is alive at its peak
(``peak_holders``: the code that allocated it, innermost segtrain frame first), where a peak differs from another's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

from segtrain.attention.backends import BACKENDS
from segtrain.checkpoint.atomic import write_text_atomic
from segtrain.config import load_model_config
from segtrain.models.llama import LlamaForCausalLM
from segtrain.plotting import pyplot
from segtrain.policy import visible_pairs
from segtrain.speed.portable import ActivationOptions, parallelize_portable

GiB = 2**30
MODES = ("stream", "documents")


def document_lengths(total: int, mean: float, seed: int, shortest: int = 64) -> list[int]:
    """Seeded long-tailed lengths (lognormal, sigma 1, mean ``mean``) that fill ``total`` tokens; the last is cut."""
    rng, sigma = random.Random(seed), 1.0
    mu = math.log(mean) - sigma**2 / 2
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(total, max(shortest, round(rng.lognormvariate(mu, sigma)))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def pairs_ratio(lengths: list[int], config) -> float:
    """Visible (query, key) pairs of the documents alone over those of one stream (every layer, KV head)."""
    S, table = config.segment_size, config.policy_table()
    stream = sum(visible_pairs(sum(lengths), S, row) for row in table.layers)
    alone = sum(visible_pairs(n, S, row) for row in table.layers for n in lengths)
    return alone / stream


def measure(model, ids, labels, positions, steps: int, warmup: int, device) -> dict:
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        if cuda and i == warmup:  # peaks beyond what a step leaves behind, once compiled (a first step may free more
            torch.cuda.synchronize()  # than it keeps: flash's stream row read a negative forward peak from before it)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, labels=labels, position_ids=positions).backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    times.sort()
    step = times[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() - base) / GiB if cuda else None
    result = dict(step_s=step, tokens_per_s=ids.numel() / step, peak_gib=peak)
    if cuda:
        result.update(split_peaks(model, ids, labels, positions, base))
    return result


def split_peaks(model, ids, labels, positions, base: int) -> dict:
    """One more step with the peak read after the forward and again after the backward (beyond ``base``): which
    half of the step holds a row's peak, the first thing to know when two rows' peaks differ."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = model(ids, labels=labels, position_ids=positions)
    torch.cuda.synchronize()
    forward = (torch.cuda.max_memory_allocated() - base) / GiB
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    backward = (torch.cuda.max_memory_allocated() - base) / GiB
    model.zero_grad(set_to_none=True)
    return dict(peak_forward_gib=forward, peak_backward_gib=backward)


def holders_at_peak(events: list[dict], top: int = 8) -> list[dict]:
    """From a CUDA caching allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``): what the blocks
    allocated during the trace and alive at its highest point add up to, grouped by the code that allocated them."""
    alive: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for e in events:
        if e.get("action") == "alloc":
            alive[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, at_peak = total, list(alive.values())
        elif e.get("action") in ("free_requested", "free_completed") and e["addr"] in alive:
            total -= alive.pop(e["addr"])["size"]
    sites: dict[str, list[int]] = {}
    for e in at_peak:
        entry = sites.setdefault(_site(e.get("frames") or []), [0, 0])
        entry[0] += e["size"]
        entry[1] += 1
    rows = [dict(where=w, gib=b / GiB, blocks=n) for w, (b, n) in sorted(sites.items(), key=lambda kv: -kv[1][0])]
    return rows[:top]


def _site(frames: list[dict]) -> str:
    """The innermost frame in segtrain's code (else the innermost Python frame) as ``file:line function``."""
    python = [f for f in frames if str(f.get("filename", "")).endswith(".py")]
    ours = [f for f in python if "segtrain" in str(f["filename"])]
    f = (ours or python or frames or [{}])[0]
    return f"{os.path.basename(str(f.get('filename', '?')))}:{f.get('line', '?')} {f.get('name', '?')}"


def snapshot_step(model, ids, labels, positions) -> list[dict]:
    """One forward + backward under the allocator's history: :func:`holders_at_peak` of it."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        model(ids, labels=labels, position_ids=positions).backward()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
        model.zero_grad(set_to_none=True)
    return holders_at_peak(snapshot["device_traces"][torch.cuda.current_device()])


def run_row(args, backend: str, mode: str, lengths: list[int], device, dtype) -> dict:
    T = sum(lengths)
    overrides = {"attention_backend": backend, "documents": mode == "documents", "max_position_embeddings": max(T, 8192)}
    if args.segment_size:
        overrides["segment_size"] = args.segment_size
    if args.layers:
        overrides["num_layers"] = args.layers
    config = load_model_config(args.shape, overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if not args.no_ac:
        parallelize_portable(model, activation=ActivationOptions(checkpointing=True))
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, config.vocab_size, (1, T + 1), generator=g).to(device)
    positions = torch.arange(T)[None] if mode == "stream" else torch.cat([torch.arange(n) for n in lengths])[None]
    try:
        result = measure(model, tokens[:, :-1], tokens[:, 1:], positions.to(device), args.steps, args.warmup, device)
        if args.snapshot and device.type == "cuda":
            result["peak_holders"] = snapshot_step(model, tokens[:, :-1], tokens[:, 1:], positions.to(device))
    except torch.cuda.OutOfMemoryError as e:
        result = dict(error="out of memory: " + str(e).splitlines()[0])
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(backend=backend, mode=mode, T=T, segment_size=config.segment_size, **result)


def print_table(meta: dict, rows: list[dict]) -> None:
    lengths = f"mean {meta['mean_length']:.0f} (median {meta['median_length']}, max {meta['max_length']})"
    mix = f"{meta['documents']} documents, {lengths}"
    print(f"GPU: {meta['device']}  shape {meta['shape']}  T={meta['T']}  {mix}, pairs {meta['pairs']:.3f}")
    print("| backend | mode | step ms | tokens/s | peak GiB | vs stream |")
    print("| --- | --- | --- | --- | --- | --- |")
    stream = {r["backend"]: r for r in rows if r["mode"] == "stream" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | {r['mode']} | {r['error']} | | | |")
            continue
        base = stream.get(r["backend"])
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base else ""
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        if "peak_forward_gib" in r:
            peak += f" (fwd {r['peak_forward_gib']:.2f}, bwd {r['peak_backward_gib']:.2f})"
        print(f"| {r['backend']} | {r['mode']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {peak} | {rel} |")


def plot(path: str, rows: list[dict]) -> None:
    plt = pyplot()
    if plt is None:
        print("(no matplotlib: no plot)")
        return
    ok = [r for r in rows if "error" not in r]
    backends = sorted({r["backend"] for r in ok}, key=[r["backend"] for r in ok].index)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s (fwd+bwd)"), (axes[1], "peak_gib", "peak GiB")):
        for i, mode in enumerate(MODES):
            values = [next((r[key] or 0 for r in ok if r["backend"] == b and r["mode"] == mode), 0) for b in backends]
            ax.bar([x + 0.4 * i for x in range(len(backends))], values, width=0.4, label=mode)
        ax.set_xticks([x + 0.2 for x in range(len(backends))], backends)
        ax.set_ylabel(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.2-1b", help="a model flavor or YAML (configs/model)")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--mean", type=float, default=4096, help="mean document length of the mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segment-size", type=int, default=None, help="default: the shape's")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape (default: all)")
    ap.add_argument("--backends", nargs="+", default=None, help="default: flex, and flash where it runs")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-ac", action="store_true", help="no activation checkpointing")
    ap.add_argument("--snapshot", action="store_true", help="also what is alive at each row's peak (memory history)")
    ap.add_argument("--tiny", action="store_true", help="the tiny shape on CPU (math backend): checks the script")
    ap.add_argument("--out", default="runs/bench_documents")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps must be at least 1 and --warmup at least 0 (got {args.steps} and {args.warmup})")
    if args.tiny:
        args.shape, args.length, args.mean, args.steps, args.warmup = "tiny", 256, 40, 1, 0
        device, dtype, backends = torch.device("cpu"), torch.float32, args.backends or ["math"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_documents needs a CUDA GPU (or --tiny to check the script on CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        backends = args.backends or ["flex"] + (["flash"] if BACKENDS["flash"].available(device) else [])
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"--backends: unknown backend {b!r}; choose from {sorted(BACKENDS)}")
    lengths = document_lengths(args.length, args.mean, args.seed)
    config = load_model_config(args.shape, {"segment_size": args.segment_size} if args.segment_size else None)
    meta = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        shape=args.shape,
        T=args.length,
        layers=args.layers or config.num_layers,
        segment_size=config.segment_size,
        activation_checkpointing=not args.no_ac,
        documents=len(lengths),
        mean_length=sum(lengths) / len(lengths),
        median_length=sorted(lengths)[len(lengths) // 2],
        max_length=max(lengths),
        lengths=lengths,
        pairs=pairs_ratio(lengths, config),
    )
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    for backend in backends:
        for mode in MODES:
            rows.append(run_row(args, backend, mode, lengths, device, dtype))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write_text_atomic(os.path.join(args.out, "bench_documents.json"), json.dumps(dict(meta=meta, rows=rows), indent=1))
    plot(os.path.join(args.out, "bench_documents.png"), rows)
    print_table(meta, rows)
    for r in rows:
        for h in r.get("peak_holders", []):
            print(f"  {r['backend']} {r['mode']}: {h['gib']:.2f} GiB in {h['blocks']} blocks from {h['where']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
