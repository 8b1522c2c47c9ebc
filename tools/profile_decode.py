"""Where a decoding step's time goes: the weights' GEMMs/GEMVs, the split-KV attention kernel, the small kernels, or
idle gaps between kernels (issue 34: the step runs at about 0.7 of the memory-bandwidth bound).

Three measurements, on random bf16 weights at the Llama-3-8B shape built the way ``bench_decode`` builds them (its
helpers, imported), with every cache filled directly with random K/V instead of a prefill:

a. the step: the engine's graph-captured decoding step (compiled layers, Triton split-KV kernel) timed with CUDA
   events, then replayed under ``torch.profiler``; CUDA kernel time is grouped by category: each projection's GEMMs
   (told apart by their launch order: q, k, v, o, gate, up, down per layer, then the LM head; with the projections
   fused with ``--fuse``: q|k|v, o, gate|up, down), the attention kernel,
   Inductor's fused kernels (norms, RoPE, SwiGLU, residuals), other kernels (cache stores, embedding, RoPE tables,
   argmax, copies), and the idle gaps (step wall time minus summed kernel time);
b. each weight shape alone, ``x @ W.T`` in bf16 at batch 1 and 16, captured in a CUDA graph over enough copies of
   the weight that the L2 cache never holds the next one: achieved GB/s against the copy bandwidth measured in the
   same run; with the fused forms (q|k|v in one ``[6144, 4096]`` weight, gate|up in one ``[28672, 4096]``) to show
   what fusing would buy;
c. the split-KV attention kernel alone over every layer of the case's cache: GB/s of the K/V it must read.

Writes ``profile.json`` into ``--out`` (after each part) and prints the markdown tables last, naming the GPU.

    python tools/profile_decode.py                  # 8B shape, 32K/128K, batch 1/16, both policies (< 4 min, H100)
    python tools/profile_decode.py --prompts 128K --batches 1 --trace   # and keep the Chrome traces (Perfetto)
    python tools/profile_decode.py --fuse           # the same with q|k|v and gate|up fused (the engine's fuse_projections)
    python tools/profile_decode.py --smoke          # tiny shapes on CPU: checks the script, not the numbers
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bench_decode import GIB, POLICIES, SMOKE_SHAPE, _k, _sync, _timed, copy_bandwidth, fuse_shared, kv_bytes_seen, weight_bytes
from bench_prefill import _device_name, _length, build_models

from segtrain.config import load_model_config
from segtrain.inference import SegmentedEngine
from segtrain.inference.memory import BatchTooLarge, check_batch_fits, device_free_bytes

LAYER_GEMMS = ("q", "k", "v", "o", "gate", "up", "down")  # the GEMMs of a decoder layer, in launch order
FUSED_LAYER_GEMMS = ("qkv", "o", "gate/up", "down")  # the same with fused projections (LlamaForCausalLM.fuse_projections)
PROJECTION = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate/up", "up": "gate/up", "down": "down"}
CATEGORIES = (
    "gemm qkv",
    "gemm o",
    "gemm gate/up",
    "gemm down",
    "gemm lm_head",
    "gemm (unattributed)",
    "attention (split-KV)",
    "fused (norms, RoPE, SwiGLU)",
    "other kernels",
    "idle gaps",
)
_ATTENTION = re.compile(r"_partial_kernel|_combine_kernel")
_GEMM_AUX = re.compile(r"splitk_?reduce", re.I)  # cuBLAS's split-K reduction: part of the GEMM before it
_GEMM = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|^aten::(mm|addmm)$", re.I)


@dataclass(frozen=True)
class Case:
    prompt: int
    batch: int
    policy: str  # a key of bench_decode.POLICIES

    @property
    def name(self) -> str:
        return f"{self.policy} {_k(self.prompt)} B{self.batch}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, not the numbers")
    p.add_argument("--shape", default="llama3-8b", help="model flavor")
    p.add_argument("--prompts", default="32K,128K", help="prompt lengths, comma-separated")
    p.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    p.add_argument("--policies", default="all25,none", help=f"comma-separated, of {sorted(POLICIES)}")
    p.add_argument("--segment-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=50, help="timed steps per case (CUDA events)")
    p.add_argument("--replays", type=int, default=10, help="steps per case under the profiler")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=180.0, help="start no new step case after this many seconds")
    p.add_argument("--fuse", action="store_true", help="q|k|v and gate|up fused, one GEMM each (the engine's fuse_projections)")
    p.add_argument("--trace", action="store_true", help="keep each case's Chrome trace in --out (open in Perfetto)")
    p.add_argument("--out", default="runs/profile_decode")
    args = p.parse_args(argv)
    unknown = sorted(set(args.policies.split(",")) - set(POLICIES))
    if unknown:
        p.error(f"--policies: unknown {unknown}; known {sorted(POLICIES)}")
    return args


# ---- timing ------------------------------------------------------------------------------------------


def graphed_seconds(calls, replays: int, device) -> float:
    """Seconds per ``calls()`` (a batch of kernel launches), captured once as a CUDA graph and replayed ``replays``
    times, so that launch overhead is not measured; eager on CPU."""
    if device.type != "cuda":
        calls()
        t0 = time.perf_counter()
        for _ in range(replays):
            calls()
        return (time.perf_counter() - t0) / replays
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        calls()  # compiles Triton kernels, picks cuBLAS algorithms
        calls()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    seconds = _timed(graph.replay, replays, 2, device)
    del graph
    return seconds


# ---- a. the step under the profiler -------------------------------------------------------------------


def kind_of(name: str) -> str:
    """``attention``, ``gemm``, ``gemm_aux`` (a split-K reduction), ``fused`` (Inductor's Triton kernels) or ``other``."""
    if _ATTENTION.search(name):
        return "attention"
    if _GEMM_AUX.search(name):
        return "gemm_aux"
    if _GEMM.search(name) and not name.startswith("triton"):
        return "gemm"
    return "fused" if name.startswith("triton_") else "other"


def categorize(kernels: list[tuple[str, float]], num_layers: int, fused: bool = False) -> dict[str, float]:
    """Summed seconds per category of ``kernels`` (name, seconds) in launch order, over any number of whole steps.

    A step launches ``7 * num_layers + 1`` GEMMs (q, k, v, o, gate, up, down per layer, then the LM head; ``fused``
    projections: ``4 * num_layers + 1``, q|k|v, o, gate|up, down); when the count is a multiple of that, each GEMM is
    named by its place, else all of them are ``gemm (unattributed)``.
    """
    layer = FUSED_LAYER_GEMMS if fused else LAYER_GEMMS
    pattern = [PROJECTION.get(g, g) for _ in range(num_layers) for g in layer] + ["lm_head"]
    n_gemms = sum(kind_of(name) == "gemm" for name, _ in kernels)
    named = n_gemms > 0 and n_gemms % len(pattern) == 0
    out: dict[str, float] = dict.fromkeys(CATEGORIES[:-1], 0.0)
    gemm, last = 0, "gemm (unattributed)"
    for name, seconds in kernels:
        kind = kind_of(name)
        if kind == "gemm":
            last = f"gemm {pattern[gemm % len(pattern)]}" if named else "gemm (unattributed)"
            gemm += 1
            out[last] += seconds
        elif kind == "gemm_aux":
            out[last] += seconds
        elif kind == "attention":
            out["attention (split-KV)"] += seconds
        elif kind == "fused":
            out["fused (norms, RoPE, SwiGLU)"] += seconds
        else:
            out["other kernels"] += seconds
    return out


def _self_times(events: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """(start, own duration, name) of nested (start, duration, name) intervals: each one's time less its children's
    (CPU operators, where an ``aten::mm`` holds an ``aten::empty``)."""
    ordered = sorted(events, key=lambda e: (e[0], -e[1]))
    own = [e[1] for e in ordered]
    stack: list[int] = []
    for i, (start, dur, _) in enumerate(ordered):
        while stack and ordered[stack[-1]][0] + ordered[stack[-1]][1] <= start:
            stack.pop()
        if stack:
            own[stack[-1]] -= dur
        stack.append(i)
    return [(start, max(0.0, t), name) for (start, _, name), t in zip(ordered, own)]


def traced_kernels(prof, cuda: bool, keep: Path | None = None) -> tuple[list[tuple[str, float]], float]:
    """(name, seconds) of what the device ran, in launch order: CUDA kernels, copies and memsets; on CPU the operators
    with their own time (the smoke run's stand-in). And the seconds from the first start to the last end. ``keep``:
    where to leave the Chrome trace (for Perfetto)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = keep or Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    cats = ("kernel", "gpu_memcpy", "gpu_memset") if cuda else ("cpu_op",)
    xs = [(e["ts"], e.get("dur", 0), e["name"]) for e in events if e.get("ph") == "X" and e.get("cat") in cats]
    span = (max(ts + dur for ts, dur, _ in xs) - min(ts for ts, _, _ in xs)) * 1e-6 if xs else 0.0
    xs = sorted(xs) if cuda else _self_times(xs)
    return [(name, dur * 1e-6) for _, dur, name in xs], span


def profiled_kernels(step, replays: int, device, keep: Path | None = None) -> tuple[list[tuple[str, float]], float]:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(replays):
            step()
        _sync(device)
    return traced_kernels(prof, cuda, keep)


def step_breakdown(
    kernels: list[tuple[str, float]], replays: int, step_s: float, num_layers: int, fused: bool = False
) -> dict[str, float]:
    """Seconds per step of each category; ``idle gaps`` is the step's wall time minus its summed kernel time."""
    per_step = {k: v / replays for k, v in categorize(kernels, num_layers, fused).items()}
    per_step["idle gaps"] = max(0.0, step_s - sum(per_step.values()))
    return per_step


def top_kernels(kernels: list[tuple[str, float]], replays: int, n: int = 12) -> list[dict]:
    """The ``n`` kernels with the most time per step (name cut at 120 characters), for reading the categories."""
    total, count = defaultdict(float), Counter()
    for name, seconds in kernels:
        total[name] += seconds
        count[name] += 1
    ranked = sorted(total, key=total.get, reverse=True)[:n]
    return [
        {"name": k[:120], "kind": kind_of(k), "ms_per_step": 1e3 * total[k] / replays, "per_step": count[k] / replays}
        for k in ranked
    ]


# ---- c. the attention kernel alone ------------------------------------------------------------------


def attention_alone(cache, config, position: int, replays: int, device) -> dict:
    """The split-KV kernel over every layer of ``cache`` at ``position``, as the step calls it."""
    from segtrain.kernels.decode_attention import available, decode_attention

    dtype = cache.layers[0].k.dtype
    q = torch.randn(cache.batch_size, config.num_heads, config.head_dim, dtype=dtype, device=device)
    if not available(q):
        return {"skipped": "the Triton kernel needs CUDA (or TRITON_INTERPRET=1 on CPU)"}
    if not q.is_cuda:  # Triton's interpreter (smoke runs) under numpy >= 2.4
        from segtrain.compat.triton import patch_interpreter_scalars

        patch_interpreter_scalars()
    positions = torch.full((cache.batch_size,), position, dtype=torch.long, device=device)
    layers = [(lay, lay.max_capacity, sum(x.capacity for x in lay.layouts)) for lay in cache.layers]
    counters = torch.zeros(cache.batch_size * config.num_kv_heads, dtype=torch.int32, device=device)  # one for every call

    def calls():
        for lay, max_capacity, total in layers:
            decode_attention(
                q, lay.k, lay.v, positions, lay.heads, max_capacity=max_capacity, total_slots=total,
                segment_size=config.segment_size, scale=cache.scale, counters=counters,
            )  # fmt: skip

    seconds = graphed_seconds(calls, replays, device)
    read = cache.batch_size * kv_bytes_seen(config, cache.policies, position, q.element_size())
    return {"position": position, "ms": 1e3 * seconds, "gb_read": read / 1e9, "gb_per_s": read / seconds / 1e9}


# ---- one step case: a and c -------------------------------------------------------------------------


def run_case(case: Case, engine: SegmentedEngine, args, device) -> dict:
    model, config = engine.model, engine.config
    cuda = device.type == "cuda"
    max_len = 64 * math.ceil((case.prompt + 2 * args.warmup + args.steps + args.replays + 8) / 64)
    if cuda:  # a case that cannot fit stops before it allocates, as generation would
        sizes = dict(weights_on_device=True, dtype=engine.dtype, prefill_chunk=engine.prefill_chunk)
        check_batch_fits(config, case.batch, max_len, device_free_bytes(device), **sizes)
    cache = engine.new_cache(case.batch, max_len)
    for t in cache.tensors():
        t.normal_()
    positions = torch.full((case.batch,), case.prompt, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    state = {"tokens": torch.randint(0, config.vocab_size, (case.batch,), device=device)}
    state["decoder"] = engine.decoder(cache, positions)
    _sync(device)
    setup_s = time.perf_counter() - t0

    def step():  # what bench_decode times: the step, the next token chosen on the device, the positions advanced
        state["tokens"] = state["decoder"](state["tokens"], positions).argmax(-1)
        positions.add_(1)

    step_s = _timed(step, args.steps, args.warmup, device)
    keep = Path(args.out) / f"trace_{case.name.replace(' ', '_')}.json" if args.trace else None
    kernels, span_s = profiled_kernels(step, args.replays, device, keep)
    fused = model.projections_fused
    breakdown = step_breakdown(kernels, args.replays, step_s, config.num_layers, fused)
    mid = case.prompt + args.warmup + args.steps // 2
    kv = case.batch * kv_bytes_seen(config, model.model.policies, mid, cache.layers[0].k.element_size())
    weights = weight_bytes(model, case.batch)
    state.clear()
    out = {
        "seconds_per_step": step_s,
        "setup_s": setup_s,
        "fused_projections": fused,
        "bytes_per_step": weights + kv,
        "weight_bytes": weights,
        "kv_bytes": kv,
        "kv_cache_gib": cache.memory_bytes() / GIB,
        "kernels_per_step": len(kernels) / args.replays,
        "profiled_ms_per_step": 1e3 * span_s / args.replays,  # the profiler's own cost shows as profiled > measured
        "ms_per_step": {k: 1e3 * v for k, v in breakdown.items()},
        "top_kernels": top_kernels(kernels, args.replays),
    }
    gemm_s = sum(v for k, v in breakdown.items() if k.startswith("gemm"))
    attention_s = breakdown["attention (split-KV)"]
    out["in_step_gb_per_s"] = {  # what the step's own kernels achieve, to hold against b and c
        "weights": weights / gemm_s / 1e9 if gemm_s else None,
        "attention": kv / attention_s / 1e9 if attention_s else None,
    }
    out["attention_alone"] = attention_alone(cache, config, int(positions[0]), 3 if cuda else 1, device)
    return out


# ---- b. each weight shape alone ---------------------------------------------------------------------


def weight_shapes(config) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each weight a step multiplies by, and of the fused forms (q|k|v, gate|up)."""
    hidden, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {
        "q": (q, hidden),
        "k": (kv, hidden),
        "v": (kv, hidden),
        "o": (hidden, q),
        "gate": (inner, hidden),
        "up": (inner, hidden),
        "down": (hidden, inner),
        "q|k|v fused": (q + 2 * kv, hidden),
        "gate|up fused": (2 * inner, hidden),
        "lm_head": (vocab, hidden),
    }


def gemv_case(shape: tuple[int, int], batch: int, dtype, device, past_cache_bytes: int) -> dict:
    """``x [batch, in] @ W.T`` cycling over copies of ``W`` that together exceed the L2 cache (as consecutive layers'
    weights do in a step), one CUDA graph of many calls; returns microseconds and GB/s per call."""
    out_f, in_f = shape
    w_bytes = out_f * in_f * torch.finfo(dtype).bits // 8
    copies = max(2, math.ceil(past_cache_bytes / w_bytes))
    weights = [torch.randn(shape, dtype=dtype, device=device) for _ in range(copies)]
    x = torch.randn(batch, in_f, dtype=dtype, device=device)
    y = torch.empty(batch, out_f, dtype=dtype, device=device)
    calls_per_graph = copies * max(1, math.ceil(8 * past_cache_bytes / (copies * w_bytes)))

    def calls():
        for i in range(calls_per_graph):
            torch.mm(x, weights[i % copies].t(), out=y)

    seconds = graphed_seconds(calls, 5, device) / calls_per_graph
    moved = w_bytes + x.nbytes + y.nbytes
    return {"us": 1e6 * seconds, "weight_mib": w_bytes / 2**20, "gb_per_s": moved / seconds / 1e9}


def gemv_rows(config, batches, dtype, device, bandwidth: float) -> list[dict]:
    past_cache = 512 * 2**20 if device.type == "cuda" else 0
    rows = []
    for name, shape in weight_shapes(config).items():
        for batch in batches:
            row = {"weight": name, "shape": list(shape), "batch": batch, **gemv_case(shape, batch, dtype, device, past_cache)}
            row["fraction_of_copy"] = 1e9 * row["gb_per_s"] / bandwidth
            rows.append(row)
            gc.collect()
    return rows


def fusion_savings(rows: list[dict], num_layers: int) -> dict[str, float]:
    """Milliseconds per step that fusing would save, per batch: (separate - fused) x layers."""
    us = {(r["weight"], r["batch"]): r["us"] for r in rows}
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        qkv = us["q", batch] + us["k", batch] + us["v", batch] - us["q|k|v fused", batch]
        gate_up = us["gate", batch] + us["up", batch] - us["gate|up fused", batch]
        out[f"B{batch} q|k|v"], out[f"B{batch} gate|up"] = num_layers * qkv / 1e3, num_layers * gate_up / 1e3
    return out


# ---- report ------------------------------------------------------------------------------------------


def _cell(ms: float, step_ms: float) -> str:
    return f"{ms:.2f} ({ms / step_ms:.2f})"


def step_table(report: dict) -> list[str]:
    """Cases as columns, categories as rows: ms per step and (fraction of the step)."""
    bw, done = report["copy_bandwidth"], [r for r in report["cases"] if "ms_per_step" in r]
    if not done:
        return []
    lines = ["Where a step goes: ms per step (fraction of the step)", ""]
    lines += ["| | " + " | ".join(r["name"] for r in done) + " |", "| --- |" + " --- |" * len(done)]
    lines.append("| step | " + " | ".join(f"{1e3 * r['seconds_per_step']:.2f}" for r in done) + " |")
    lines.append("| bound | " + " | ".join(f"{1e3 * r['bytes_per_step'] / bw:.2f}" for r in done) + " |")
    lines.append("| bound / step | " + " | ".join(f"{r['bytes_per_step'] / bw / r['seconds_per_step']:.2f}" for r in done) + " |")
    for cat in CATEGORIES:
        if any(r["ms_per_step"][cat] for r in done):
            cells = [_cell(r["ms_per_step"][cat], 1e3 * r["seconds_per_step"]) for r in done]
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    for part in ("weights", "attention"):
        rates = [r["in_step_gb_per_s"][part] for r in done]
        cells = [f"{g:.0f} ({1e9 * g / bw:.2f})" if g else "-" for g in rates]
        lines.append(f"| {part} GB/s in the step (of copy) | " + " | ".join(cells) + " |")
    alone = [r["attention_alone"] for r in done]
    lines.append("| attention alone, ms | " + " | ".join(f"{a['ms']:.2f}" if "ms" in a else "-" for a in alone) + " |")
    cells = [f"{a['gb_per_s']:.0f} ({1e9 * a['gb_per_s'] / bw:.2f})" if "ms" in a else "-" for a in alone]
    return lines + ["| attention alone, GB/s (of copy) | " + " | ".join(cells) + " |"]


def gemv_table(report: dict) -> list[str]:
    """Weights as rows, batches as columns: us per call, GB/s and (fraction of the copy bandwidth)."""
    rows = report.get("gemv", [])
    if not rows:
        return []
    batches = sorted({r["batch"] for r in rows})
    by = {(r["weight"], r["batch"]): r for r in rows}
    lines = ["Each weight alone (x @ W.T, CUDA graph): us per call, GB/s (fraction of copy)", ""]
    lines += ["| weight | shape | " + " | ".join(f"B{b}" for b in batches) + " |", "| --- | --- |" + " --- |" * len(batches)]
    for name in dict.fromkeys(r["weight"] for r in rows):
        cells = [by[name, b] for b in batches]
        cells = [f"{c['us']:.1f} us, {c['gb_per_s']:.0f} ({c['fraction_of_copy']:.2f})" for c in cells]
        lines.append(f"| {name} | {by[name, batches[0]]['shape']} | " + " | ".join(cells) + " |")
    saved = ", ".join(f"{k} {v:.2f}" for k, v in report["fusion_saves_ms_per_step"].items())
    return lines + ["", f"Fusing would save (ms per step): {saved}"]


def markdown(report: dict) -> str:
    lines = [f"GPU: {report['device']}, copy bandwidth {report['copy_bandwidth'] / 1e12:.2f} TB/s (read + write)", ""]
    lines += step_table(report)
    lines += [f"{r['name']}: {r.get('error') or r.get('skipped')}" for r in report.get("cases", []) if "ms_per_step" not in r]
    return "\n".join(lines + [""] + gemv_table(report))


def write_json(report: dict, path: Path) -> None:
    """Write-then-rename: an interrupted run leaves the last complete report."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("profile_decode needs a CUDA GPU (or --smoke to check the script on CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts, batches = [_length(x) for x in args.prompts.split(",")], [int(b) for b in args.batches.split(",")]
    if args.smoke:
        prompts, batches, args.segment_size = [300], [1, 2], 64
        args.steps, args.replays, args.warmup = 3, 2, 2
    cases = [Case(p, b, policy) for b in batches for p in prompts for policy in args.policies.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    report = {"device": _device_name(device), "copy_bandwidth": bandwidth, "shape": "smoke" if args.smoke else args.shape}
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    fields = {**(SMOKE_SHAPE if args.smoke else {}), "segment_size": args.segment_size}
    config = load_model_config("tiny" if args.smoke else args.shape, {**fields, "max_position_embeddings": max(prompts) + 4096})
    with torch.inference_mode():
        report["gemv"] = gemv_rows(config, sorted({1, 16} | set(batches)), dtype, device, bandwidth)
    report["fusion_saves_ms_per_step"] = fusion_savings(report["gemv"], config.num_layers)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the weight copies' memory, before the model's
    print(f"weights alone: {len(report['gemv'])} cases ({time.perf_counter() - t_start:.0f}s)", flush=True)
    write_json(report, out_dir / "profile.json")

    torch.manual_seed(0)
    _, seg = build_models(config, device, dtype, {p: POLICIES[p] for p in dict.fromkeys(c.policy for c in cases)})
    if args.fuse:
        fuse_shared(seg)
    engines = {
        name: SegmentedEngine(
            model,
            decode="graph" if device.type == "cuda" else "eager",
            decode_attention="triton" if device.type == "cuda" else "torch",
            compile_decode=None if device.type == "cuda" else "eager",
            fuse_projections=args.fuse,
        )
        for name, model in seg.items()
    }
    report["cases"] = []
    for case in cases:
        row = {"name": case.name, **asdict(case)}
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            row["skipped"] = f"time budget ({elapsed:.0f}s > {args.budget_s:.0f}s)"
        else:
            try:
                with torch.inference_mode():
                    row.update(run_case(case, engines[case.policy], args, device))
            except BatchTooLarge as e:
                row["skipped"] = str(e)
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = "out of memory: " + str(e).splitlines()[0][:200]
        row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        report["cases"].append(row)
        what = row.get("error") or row.get("skipped") or f"{1e3 * row['seconds_per_step']:.2f} ms/step"
        print(f"  {case.name}: {what} ({row['elapsed_s']:.0f}s)", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(report, out_dir / "profile.json")
    print(f"json: {out_dir / 'profile.json'}  ({time.perf_counter() - t_start:.0f}s)\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
