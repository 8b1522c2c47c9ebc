"""Decoding speed: segtrain's graph-captured decoding step against Hugging Face Llama, with the memory-bandwidth bound.

Systems, each at a prompt length and a batch size (every row at the same position), random bf16 weights built on the
device once per shape and shared by every case:

- ``seg`` (policy ``all25``: 25% of KV heads ``all``, the rest ``none``; or ``none``: every head ``none``): the
  engine's default on CUDA: the step captured as a CUDA graph, decoder layers compiled, the Triton split-KV kernel
  (``attn=sdpa``: masked SDPA per policy group instead), separate q, k, v and gate, up projections (``--fuse``:
  fused, one GEMM each; ``--fuse both``: each kernel row again, fused, after the others, to compare in one run).
  Rows record the split-KV kernel's launch (``$SEGTRAIN_DECODE_KERNEL`` where set, ``tools/tune_decode_attention.py``);
  ``--compare-kernel SPEC [SPEC ...]``: each kernel row again with the kernel launched as each SPEC (``store=0``: the
  step's K/V stored by indexing before the kernel, as before; ``merge=1``: the splits merged in the same launch).
- ``hf_eager``: ``transformers.LlamaForCausalLM`` (SDPA) with its default ``DynamicCache`` (full cache, eager).
- ``hf_static``: the same model with a ``StaticCache`` and ``torch.compile(mode="reduce-overhead")``: what a user
  would pick for fast decoding.

Decoding speed does not depend on the cached values, so every cache (segtrain's and HF's) is filled directly with
random K/V as if the prompt had been prefilled, instead of running 128K-token prefills. A case warms up (compiles,
captures), then times ``--steps`` full decoding steps with CUDA events: the model, the next token chosen on the
device (argmax), the positions advanced; no host synchronisation inside the timed loop.

The bound: bytes a step must read (the weights once, except the embedding table of which only the batch's rows are
read, plus the K/V each row's queries see) divided by the copy bandwidth measured once in the same run
(``dst.copy_(src)`` of 2 GiB, read + write). ``fraction`` = bound / measured time. Writes ``decode.json`` and
``decode.png`` (matplotlib) into ``--out``; the markdown table is printed last.

    python tools/bench_decode.py --quick            # the headline rows, Llama-3-8B shape (about 4 minutes on an H200)
    python tools/bench_decode.py                     # 1B and 8B shapes, 32K and 128K, batch 1 and 16, all systems
    python tools/bench_decode.py --quick --fuse both   # and every kernel row again with fused projections
    python tools/bench_decode.py --quick --fuse --compare-kernel store=0 merge=1   # fused; two other kernel launches too
    python tools/bench_decode.py --smoke             # tiny shapes on CPU: checks the script, not the numbers
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from unittest import mock

import torch
from bench_prefill import _device_name, _length, build_models

from segtrain.config import load_model_config
from segtrain.inference import SegmentedEngine
from segtrain.kernels.decode_attention import ENV, Launch, default_launch
from segtrain.plotting import pyplot
from segtrain.policy import history_end

GIB = 2**30
POLICIES = {"all25": {"fraction": 0.25}, "none": "none"}
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32)


@dataclass(frozen=True)
class Case:
    shape: str
    system: str  # seg | hf_eager | hf_static
    prompt: int
    batch: int
    policy: str = "all25"  # seg only
    attn: str = "triton"  # seg only: triton | sdpa
    fused: bool = False  # seg only: q|k|v and gate|up fused
    kernel: str = ""  # seg with attn=triton: the split-KV kernel's launch ($SEGTRAIN_DECODE_KERNEL's syntax; "": as set)

    @property
    def name(self) -> str:
        what = (
            f"seg {self.policy}" + ("" if self.attn == "triton" else f" ({self.attn})") if self.system == "seg" else self.system
        )
        kernel = f" [{self.kernel}]" if self.kernel else ""
        return f"{self.shape} {what}{' fused' if self.fused else ''}{kernel} {_k(self.prompt)} B{self.batch}"


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


QUICK = [  # the acceptance rows first, then the baselines and extras, as the time budget allows
    Case("llama3-8b", "seg", 131072, 1, "all25"),
    Case("llama3-8b", "seg", 131072, 1, "none"),
    Case("llama3-8b", "seg", 32768, 1, "none"),
    Case("llama3-8b", "seg", 32768, 16, "all25"),
    Case("llama3-8b", "seg", 131072, 16, "all25"),
    Case("llama3-8b", "hf_static", 131072, 1),  # gpt-fast style: what fits beside 64 GiB of KV on an 80 GB card
    Case("llama3-8b", "hf_static", 32768, 1),
    Case("llama3-8b", "hf_static", 32768, 16),
    Case("llama3-8b", "seg", 32768, 1, "all25"),
    Case("llama3-8b", "seg", 131072, 1, "all25", "sdpa"),
    Case("llama3-8b", "hf_eager", 131072, 1),
    Case("llama3-8b", "hf_eager", 32768, 16),
]


def full_cases(shapes, prompts, batches) -> list[Case]:
    cases = []
    for shape in shapes:
        for prompt in prompts:
            for batch in batches:
                cases += [Case(shape, "seg", prompt, batch, "all25"), Case(shape, "seg", prompt, batch, "none")]
                cases += [Case(shape, "hf_static", prompt, batch), Case(shape, "hf_eager", prompt, batch)]
        cases.append(Case(shape, "seg", max(prompts), 1, "all25", "sdpa"))
    return cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the headline rows only (Llama-3-8B shape)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (eager steps): checks the script, not the numbers")
    p.add_argument("--shapes", default="llama3.2-1b,llama3-8b", help="model flavors, comma-separated (full run)")
    p.add_argument("--prompts", default="32K,128K", help="prompt lengths, comma-separated (full run)")
    p.add_argument("--batches", default="1,16", help="batch sizes, comma-separated (full run)")
    p.add_argument("--segment-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="timed decoding steps per case (HF eager: a quarter)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds (quick: 300)")
    p.add_argument(
        "--fuse", nargs="?", const="on", default="off", choices=["off", "on", "both"],
        help="seg: q|k|v and gate|up fused, one GEMM each (the engine's fuse_projections); both: the kernel rows "
        "unfused, then again fused",
    )  # fmt: skip
    p.add_argument(
        "--compare-kernel", nargs="+", default=[], metavar="SPEC",
        help="each split-KV kernel row again with the kernel launched as each SPEC ($SEGTRAIN_DECODE_KERNEL's syntax, "
        "e.g. store=0), right after the kernel rows",
    )  # fmt: skip
    p.add_argument("--systems", default="seg,hf_static,hf_eager", help="which systems' rows to run, comma-separated")
    p.add_argument("--out", default="runs/bench_decode")
    args = p.parse_args(argv)
    unknown = set(args.systems.split(",")) - {"seg", "hf_static", "hf_eager"}
    if unknown:
        p.error(f"--systems: {', '.join(sorted(unknown))} is not one of seg, hf_static, hf_eager")
    for spec in args.compare_kernel:
        try:
            Launch.parse(spec)
        except ValueError as e:  # UserError: one line naming the field
            p.error(f"--compare-kernel: {e}")
    return args


# ---- bytes and bandwidth ---------------------------------------------------------------------------


def fuse_shared(seg: dict, hf=None) -> None:
    """Fuse the segtrain models' projections once for all of them (and ``hf``, which shares their weights): each would
    otherwise fuse into its own new tensors (the engine fuses on CUDA) and the shared weights would exist twice."""
    first, *others = seg.values()
    first.fuse_projections()
    for model in [*others, *([hf] if hf is not None else [])]:
        model.load_state_dict(first.state_dict(), assign=True)  # views of the fused weights
    for model in others:
        model.fuse_projections()  # the weights lie back to back already: no copy


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy (read + write), the ceiling a decoding step streams at."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2 * GIB, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    return 2 * 10 * 2 * GIB / seconds


def weight_bytes(model, batch: int) -> int:
    """Bytes of weights one step reads: all of them once, except the embedding table (only ``batch`` rows) unless the
    LM head shares it (HF and segtrain models name them alike)."""
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    total = sum(params.values())
    if embed.data_ptr() != head.data_ptr():
        total -= params[embed.data_ptr()] - batch * embed.shape[1] * embed.element_size()
    return total


def kv_bytes_seen(config, policies, position: int, dtype_bytes: int) -> int:
    """K/V bytes the query at ``position`` must read over all layers (one row): each head's visible keys."""
    S = config.segment_size
    end = history_end(position // S, S)
    keys = sum(p.history_count(end) + position - end + 1 for row in policies.layers for p in row)
    return keys * 2 * config.head_dim * dtype_bytes


# ---- one case ----------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, steps: int, warmup: int, device) -> float:
    """Seconds per call of ``step()`` over ``steps`` calls after ``warmup`` (CUDA events: no sync inside the loop)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def run_seg(case: Case, seg, args, device) -> dict:
    model = seg[case.policy]
    smoke = device.type != "cuda"
    engine = SegmentedEngine(
        model,
        decode="eager" if smoke else "graph",
        decode_attention=("torch" if case.attn == "triton" else case.attn) if smoke else case.attn,
        compile_decode="eager" if smoke else None,
        fuse_projections=case.fused,
    )
    max_len = 64 * math.ceil((case.prompt + 2 * args.warmup + args.steps + 8) / 64)  # aligned rows for SDPA masks
    cache = engine.new_cache(case.batch, max_len)
    for t in cache.tensors():
        t.normal_()
    positions = torch.full((case.batch,), case.prompt, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    decoder = engine.decoder(cache, positions)
    _sync(device)
    setup_s = time.perf_counter() - t0
    state = {"tokens": torch.randint(0, model.config.vocab_size, (case.batch,), device=device), "decoder": decoder}
    del decoder

    def step():
        state["tokens"] = state["decoder"](state["tokens"], positions).argmax(-1)
        positions.add_(1)

    seconds = _timed(step, args.steps, args.warmup, device)
    mid = case.prompt + args.warmup + args.steps // 2
    kv = kv_bytes_seen(model.config, model.model.policies, mid, cache.layers[0].k.element_size())
    out = {
        "seconds_per_step": seconds,
        "setup_s": setup_s,
        "bytes_per_step": weight_bytes(model, case.batch) + case.batch * kv,
        "kv_cache_gib": cache.memory_bytes() / GIB,
        "decode": engine.decode,
        "compiled": engine.compile_backend is not None,
        "fused_projections": model.projections_fused,
        "decode_kernel": default_launch().spec() if engine.decode_attention == "triton" else None,
    }
    state.clear()
    return out


def with_kernel_again(cases: list[Case], specs: list[str]) -> list[Case]:
    """Each group of split-KV kernel rows (unfused, fused) followed at once by the same rows with the kernel launched as
    each of ``specs``: the rows compared run minutes apart at most."""

    def kernel_row(c: Case) -> bool:
        return c.system == "seg" and c.attn == "triton" and not c.kernel

    out = []
    for i, c in enumerate(cases):
        out.append(c)
        if kernel_row(c) and not any(kernel_row(x) and x.fused == c.fused for x in cases[i + 1 :]):
            out += [replace(x, kernel=s) for s in specs for x in cases if kernel_row(x) and x.fused == c.fused]
    return out


def _hf_kwargs(hf) -> tuple[str, bool]:
    """The cache keyword of this transformers version's forward (``cache`` or ``past_key_values``), and whether it
    takes ``cache_position`` (older 5.x static caches are indexed by it)."""
    params = inspect.signature(hf.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "cache_position" in params


def run_hf(case: Case, hf, args, device) -> dict:
    import transformers

    cfg = hf.config
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    dtype = next(hf.parameters()).dtype
    cache_kw, takes_position = _hf_kwargs(hf)
    steps = max(2, args.steps // 4) if case.system == "hf_eager" else args.steps
    max_len = 64 * math.ceil((case.prompt + 2 * args.warmup + steps + 8) / 64)  # aligned, as for segtrain's cache
    extra = {}
    if case.system == "hf_eager":
        try:
            cache = transformers.DynamicCache(config=cfg)
        except TypeError:  # older 5.x
            cache = transformers.DynamicCache()
        for layer in range(cfg.num_hidden_layers):
            k, v = (torch.randn(case.batch, kv_heads, case.prompt, head_dim, dtype=dtype, device=device) for _ in range(2))
            cache.update(k, v, layer)
            del k, v
        forward = hf
    else:
        cache = transformers.StaticCache(config=cfg, max_cache_len=max_len)
        if hasattr(cache, "early_initialization"):
            cache.early_initialization(batch_size=case.batch, num_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device)
        else:  # older 5.x: each layer allocates on its first (here empty) update
            empty = torch.zeros(case.batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
            for layer in cache.layers:
                layer.lazy_initialization(empty, empty)
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            if hasattr(layer, "cumulative_length"):  # 5.2x: the layer indexes itself
                layer.cumulative_length.fill_(case.prompt)
        mode = "reduce-overhead" if device.type == "cuda" else None
        backend = "inductor" if device.type == "cuda" else "eager"
        forward = torch.compile(hf.forward, mode=mode, backend=backend, fullgraph=True)
        extra["fullgraph"] = True
    positions = torch.full((case.batch, 1), case.prompt, dtype=torch.long, device=device)
    state = {"tokens": torch.randint(0, cfg.vocab_size, (case.batch, 1), device=device), "forward": forward}
    kwargs = {cache_kw: cache, "use_cache": True, "position_ids": positions}
    if takes_position and case.system == "hf_static":
        kwargs["cache_position"] = positions[0]
    del cache, forward

    def step():
        if case.system == "hf_static" and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = state["forward"](input_ids=state["tokens"], **kwargs).logits
        state["tokens"] = logits[:, -1].argmax(-1, keepdim=True)
        positions.add_(1)

    t0 = time.perf_counter()
    try:
        step()  # compiles (static)
    except Exception as e:  # a graph break under fullgraph: compile what it can
        if case.system != "hf_static":
            raise
        print(f"  fullgraph compile failed ({type(e).__name__}: {str(e)[:200]}); retrying without fullgraph", flush=True)
        torch._dynamo.reset()
        state["forward"] = torch.compile(hf.forward, mode=mode, backend=backend)
        extra["fullgraph"] = False
        step()
    _sync(device)
    setup_s = time.perf_counter() - t0
    seconds = _timed(step, steps, args.warmup - 1, device)
    mid = case.prompt + args.warmup + steps // 2
    kv = cfg.num_hidden_layers * kv_heads * (mid + 1) * 2 * head_dim * dtype.itemsize  # full attention sees every key
    out = {"seconds_per_step": seconds, "setup_s": setup_s, "bytes_per_step": weight_bytes(hf, case.batch) + case.batch * kv}
    out["kv_cache_gib"] = case.batch * cfg.num_hidden_layers * kv_heads * 2 * head_dim * dtype.itemsize * max_len / GIB
    state.clear()
    kwargs.clear()
    return {**out, **extra}


# ---- report ------------------------------------------------------------------------------------------


def markdown(rows, bandwidth: float) -> str:
    lines = [
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)\n",
        "| case | ms/token | tokens/s | KV cache GiB | GB read/step | bound ms | fraction of bound | setup s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['name']} | {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {1e3 * r['seconds_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['kv_cache_gib']:.1f} | "
            f"{r['bytes_per_step'] / 1e9:.1f} | {r['bound_ms']:.2f} | {r['fraction']:.2f} | {r['setup_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        print(f"(matplotlib is not installed: no plot at {path})")
        return False
    done = [r for r in rows if "seconds_per_step" in r]
    if not done:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(done) + 1.5))
    y = range(len(done))
    ax.barh(list(y), [1e3 * r["seconds_per_step"] for r in done], color=["C0" if r["system"] == "seg" else "C1" for r in done])
    ax.scatter([r["bound_ms"] for r in done], list(y), marker="|", s=300, color="k", label="bandwidth bound", zorder=3)
    ax.set_yticks(list(y), [r["name"] for r in done])
    ax.invert_yaxis()
    ax.set(xlabel="ms per decoding step (lower is better)", xscale="log")
    ax.grid(alpha=0.3, axis="x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_decode needs a CUDA GPU (or --smoke to check the script on CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        cases = [
            Case("smoke", "seg", 300, 2, "all25"),
            Case("smoke", "seg", 300, 2, "none"),
            Case("smoke", "seg", 300, 1, "all25", "sdpa"),
        ]
        cases += [Case("smoke", "hf_static", 300, 2), Case("smoke", "hf_eager", 300, 2)]
        args.segment_size, args.steps, args.warmup = 64, 4, 2
    elif args.quick:
        cases = QUICK
    else:
        prompts = [_length(x) for x in args.prompts.split(",")]
        cases = full_cases(args.shapes.split(","), prompts, [int(b) for b in args.batches.split(",")])
    if args.fuse == "on":
        cases = [replace(c, fused=True) if c.system == "seg" else c for c in cases]
    elif args.fuse == "both":  # the models are fused once, in place, shared weights and all: unfused rows first
        seg = [c for c in cases if c.system == "seg"]
        fused = [replace(c, fused=True) for c in seg if c.attn == "triton"]
        static, eager = ([c for c in cases if c.system == s] for s in ("hf_static", "hf_eager"))
        cases = seg + static + fused + eager  # HF's compiled baseline before the fused rows: a budget cuts the extras
    if args.compare_kernel:
        cases = with_kernel_again(cases, args.compare_kernel)
    cases = [c for c in cases if c.system in args.systems.split(",")]
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.quick else math.inf)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    print(f"{_device_name(device)}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape in dict.fromkeys(c.shape for c in cases):
        base = "tiny" if args.smoke else shape
        fields = {**(SMOKE_SHAPE if args.smoke else {}), "segment_size": args.segment_size}
        longest = max(c.prompt for c in cases if c.shape == shape)
        config = load_model_config(base, {**fields, "max_position_embeddings": longest + 4096})
        torch.manual_seed(0)
        hf, seg = build_models(config, device, dtype, POLICIES)
        print(f"{shape}: {sum(p.numel() for p in hf.parameters()) / 1e9:.2f}B parameters, {dtype}", flush=True)
        for case in (c for c in cases if c.shape == shape):
            row = {"name": case.name, **asdict(case)}
            elapsed = time.perf_counter() - t_start
            if elapsed > budget:
                row["skipped"] = f"time budget ({elapsed:.0f}s > {budget:.0f}s)"
            else:
                try:
                    fused = next(iter(seg.values())).projections_fused
                    if case.fused and not fused:
                        fuse_shared(seg, hf)
                    elif fused and case.system == "seg" and not case.fused:
                        raise RuntimeError("an unfused case after the models were fused (cases out of order)")
                    if case.system == "seg":  # what generate runs under; the kernel's launch while its graph is captured
                        with torch.inference_mode(), mock.patch.dict(os.environ, {ENV: case.kernel} if case.kernel else {}):
                            row.update(run_seg(case, seg, args, device))
                    else:  # what transformers' generate runs under (its compiled static cache is tested that way)
                        with torch.no_grad():
                            row.update(run_hf(case, hf, args, device))
                    row["tokens_per_s"] = case.batch / row["seconds_per_step"]
                    row["bound_ms"] = 1e3 * row["bytes_per_step"] / bandwidth
                    row["fraction"] = row["bound_ms"] / (1e3 * row["seconds_per_step"])
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
            row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            (out_dir / "decode.json").write_text(
                json.dumps({"device": _device_name(device), "copy_bandwidth": bandwidth, "rows": rows}, indent=1)
            )
        del hf, seg
        gc.collect()
    if plot(rows, out_dir / "decode.png"):
        print(f"plot: {out_dir / 'decode.png'}")
    print(f"json: {out_dir / 'decode.json'}  ({time.perf_counter() - t_start:.0f}s)\n")
    print(markdown(rows, bandwidth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
