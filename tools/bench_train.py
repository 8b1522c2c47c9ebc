"""Training throughput: segtrain's speed levers, each on and off in one run, against full causal attention.

    python tools/bench_train.py --lengths 32768 --variants causal flex flash flash+compile --profile --out $OUT/bt
    python tools/bench_train.py --lengths 32768 --megatron --variants flex   # + megatron-core model, TP=1
    torchrun --nproc-per-node 2 tools/bench_train.py --lengths 32768 --megatron --variants  # megatron TP=2 only

A variant is ``causal`` (the same model with every attention slot filled with causal SDPA-flash: full
attention, gradient into every key; the baseline) or a segtrain backend (``flex``, ``flash``), with
levers joined by ``+``: ``compile`` (``portable.compile``, segtrain/speed/compile.py) and
``acN`` (``portable.activation.layers: N``; ``ac0``: no activation checkpointing; without it every
layer is recomputed) and ``kaN`` (``activation.keep_attention: N``: the first N checkpointed layers
recompute around their attention slot and keep its tensors), ``kmN`` (``activation.keep_matmuls: N``:
of those, the first N also keep their output, gate and up projections' outputs), ``off`` (``activation.offload``:
what checkpointed layers keep waits in host memory) and ``fl`` (``portable.fused_loss``: the loss's gradients computed in its
forward), e.g. ``flash+compile+ac14``, ``flash+compile+ka16+km4+off+fl``.

One GPU, batch 1, bf16 weights, fused AdamW. MFU counts model FLOPs only (recompute excluded):
6 x (non-embedding parameters + LM head) per token, plus attention 3 x 4 x D per (query head, visible
key) pair: segtrain counts only the keys its policy makes visible; the peak is the H100/H200 dense
BF16 989 TFLOP/s.

``--profile`` adds, per variant, one step's phases (forward; backward with recompute; optimizer) from
CUDA events, and one step under torch.profiler with the GPU kernel time summed by category
(attention, GEMM, elementwise and norms, loss, optimizer, copies, FP8 casts, communication) and the idle
rest; with ``--megatron`` on one GPU the megatron variants are profiled too.

``--megatron`` adds the megatron-core model (models/megatron.py: same operator, megatron's layers and
fused elementwise kernels, full recompute of every layer, chunked loss; ``--megatron-unfused`` adds it
without the fusions) with TP = the number of processes (torchrun). The single-GPU variants run on rank 0
alone first, in the same run. tokens/s is per model replica (a TP=2 model uses 2 GPUs); peak memory is
rank 0's, counted above what was allocated before the variant was built. ``--isolate`` (one GPU) runs each
variant in a fresh process: in one process an earlier variant's leftovers (megatron keeps 1-3 GiB per
model) can be reused or freed during the next, and its peak then reads low or high by gigabytes. Results
go to OUT/bench_train.json after every row (a crash keeps what ran) and OUT/bench_train.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from segtrain.attention import fill_slots
from segtrain.checkpoint.atomic import write_text_atomic
from segtrain.config import load_model_config
from segtrain.loss import loss_weights
from segtrain.models.llama import LlamaForCausalLM
from segtrain.plotting import pyplot
from segtrain.policy import visible_pairs
from segtrain.speed.portable import ActivationOptions, parallelize_portable

GiB = 2**30
H100_BF16_DENSE = 989e12  # the H200 has the same tensor cores
BASES = ("causal", "flex", "flash")
# first match wins: attention kernels name flash/fmha/flex; inductor names its fused kernels after their ops
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "flex", "triton_tem")),
    ("optimizer", ("multi_tensor", "adam")),
    ("loss", ("cross_entropy", "log_softmax", "logsoftmax", "nll_loss")),
    ("fp8 cast/amax", ("cast_transpose", "quantize", "amax", "scale_update")),  # Transformer Engine's FP8 casts
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
    ("communication", ("nccl",)),
    ("host copies", ("memcpy dtoh", "memcpy htod")),  # activation.offload's, on side streams beside the compute
    ("copy/cast/fill", ("memcpy", "memset", "copy", "fill")),
)
BESIDE = ("host copies",)  # categories that overlap the compute stream: not subtracted from the step for idle
OTHER = "elementwise/norm/rope"


class CausalSDPA(torch.nn.Module):
    """The baseline's attention slot: full causal attention by SDPA's flash kernel."""

    def forward(self, q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def parse_variant(spec: str) -> dict:
    """``flash+compile+ac14`` -> ``{base: flash, compile: True, ac_layers: 14}``; a bad spec exits naming it."""
    base, *levers = spec.split("+")
    if base not in BASES:
        sys.exit(f"--variants: {spec!r} must start with one of {list(BASES)}")
    out = dict(name=spec, base=base, compile=False, ac_layers=None, keep_attention=0, keep_matmuls=0, offload=False,
               fused_loss=False)  # fmt: skip
    for lever in levers:
        if lever in ("compile", "off", "fl"):
            out[{"compile": "compile", "off": "offload", "fl": "fused_loss"}[lever]] = True
        elif lever.startswith("ac") and lever[2:].isdigit():
            out["ac_layers"] = int(lever[2:])
        elif lever.startswith("ka") and lever[2:].isdigit():
            out["keep_attention"] = int(lever[2:])
        elif lever.startswith("km") and lever[2:].isdigit():
            out["keep_matmuls"] = int(lever[2:])
        else:
            sys.exit(f"--variants: unknown lever {lever!r} in {spec!r} (compile, acN, kaN, kmN, off, fl)")
    return out


def kernel_category(name: str) -> str:
    low = name.lower()
    if low.startswith(("triton_poi", "triton_red", "triton_per")):  # inductor's fused pointwise/reductions
        return "loss" if any(k in low for k in ("log_softmax", "nll_loss")) else OTHER
    for category, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return category
    return OTHER


def summarize_kernels(kernels: list[tuple[str, float]], step_s: float) -> dict:
    """Seconds per category from ``(kernel name, seconds)`` pairs, plus ``idle``: the step's time no kernel ran."""
    by = defaultdict(float)
    for name, seconds in kernels:
        by[kernel_category(name)] += seconds
    by = dict(sorted(by.items(), key=lambda kv: -kv[1]))
    by["idle"] = max(0.0, step_s - sum(v for k, v in by.items() if k not in BESIDE))
    return by


def top_kernels(kernels: list[tuple[str, float]], n: int = 15) -> list[dict]:
    """The ``n`` kernels (by name) that took the most time: where to look next."""
    by = defaultdict(lambda: [0.0, 0])
    for name, seconds in kernels:
        by[name][0] += seconds
        by[name][1] += 1
    ranked = sorted(by.items(), key=lambda kv: -kv[1][0])[:n]
    return [dict(name=name[:160], category=kernel_category(name), seconds=s, calls=c) for name, (s, c) in ranked]


def model_flops_per_step(model: LlamaForCausalLM, T: int, causal: bool) -> float:
    c = model.config
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if c.tie_word_embeddings:
        dense += model.lm_head.weight.numel()
    group = c.num_heads // c.num_kv_heads
    head_dim = c.head_dim or c.hidden_size // c.num_heads
    if causal:
        pairs = c.num_layers * c.num_heads * T * (T + 1) // 2
    else:
        pairs = sum(visible_pairs(T, c.segment_size, model.model.policies[i]) * group for i in range(c.num_layers))
    return 6 * dense * T + 3 * 4 * head_dim * pairs


def bench_config(args, T: int, backend: str):
    """The model shape with the benchmark's segment execution, long enough for ``T`` tokens."""
    overrides = {
        "segment_size": args.segment_size,
        "attention_backend": backend,
        "history_policy": {"fraction": args.fraction_all},
        "max_position_embeddings": max(T, 8192),
    }
    return load_model_config(args.shape, overrides)


def build_variant(args, variant: dict, T: int):
    cfg = bench_config(args, T, "flex" if variant["base"] == "causal" else variant["base"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if variant["base"] == "causal":  # the same model, every layer's attention slot filled with causal SDPA
        fill_slots(model, lambda slot: CausalSDPA())
    return parallelize_portable(model, compile=variant["compile"], activation=activation_of(variant)), cfg


def activation_of(variant: dict) -> ActivationOptions:
    """The variant's ``portable.activation`` (``ac0``: no checkpointing; no ``acN``: every layer)."""
    layers = variant["ac_layers"]
    return ActivationOptions(checkpointing=layers != 0, layers=layers or None, keep_attention=variant["keep_attention"],
                             keep_matmuls=variant["keep_matmuls"], offload=variant["offload"])  # fmt: skip


def bench(model, T: int, steps: int, warmup: int, vocab: int, profile: bool = False, base_bytes: int = 0,
          fused_loss: bool = False) -> dict:  # fmt: skip
    """Median step time over ``steps`` after ``warmup``; the peak is counted above ``base_bytes`` (what was allocated
    before the model was built: an earlier variant's leftovers, e.g. compiled kernels' workspaces, do not count).
    ``fused_loss`` passes the mean's weights into the forward, as the ``fused_loss`` training option does."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.randint(0, vocab, (1, T + 1), device="cuda", generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    weights = dict(loss_weights=loss_weights(y)) if fused_loss else {}

    def step(events=None):
        mark = (lambda i: events[i].record()) if events else (lambda i: None)
        mark(0)
        loss = model(x, labels=y, **weights)
        mark(1)
        loss.backward()
        mark(2)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark(3)
        return loss

    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    times.sort()
    peak = (torch.cuda.max_memory_allocated() - base_bytes) / GiB
    out = dict(step_s=times[len(times) // 2], peak_gib=peak, losses=losses, leftover_gib=base_bytes / GiB)
    if profile:
        out["phases_s"], out["kernels_s"], out["top_kernels"] = profile_step(step)
    return out


def profile_step(step) -> tuple[dict, dict, list[dict]]:
    """One step's phases from CUDA events, then one step's kernel time by category from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    step(events)
    torch.cuda.synchronize()
    phases = {name: events[i].elapsed_time(events[i + 1]) / 1e3 for i, name in enumerate(("forward", "backward", "optimizer"))}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [(e.name, e.time_range.elapsed_us() / 1e6) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return phases, summarize_kernels(kernels, wall), top_kernels(kernels)


def megatron_model(cfg, tp: int, fp8: bool = False, fused: bool = True):
    """The megatron model as the recipe builds it (``build_options``): full recompute of every layer, FP8 with the
    training option's defaults (TE's FP8 GEMMs, delayed scaling), megatron's fusions or not."""
    from segtrain.models.megatron import build_gpt_model, init_model_parallel
    from segtrain.train.recipes.megatron import FP8_DEFAULTS, MegatronActivation, MegatronConfig, build_options

    init_model_parallel(tp, 1, seed=0)
    options = MegatronConfig(fp8=dict(FP8_DEFAULTS) if fp8 else None, fusions=fused,
                             activation=MegatronActivation(checkpointing=True))  # fmt: skip
    return build_gpt_model(cfg, tp=tp, dtype=torch.bfloat16, **build_options(options, torch.device("cuda"))).cuda()


def megatron_bench(model, T: int, steps: int, warmup: int, vocab: int, profile: bool = False, base_bytes: int = 0) -> dict:
    """:func:`bench` for the megatron model: positional inputs, per-token loss from megatron's vocab-parallel CE."""
    positions = torch.arange(T, device="cuda")[None]

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x, labels):
            self.m.set_is_first_microbatch()  # one micro-batch per step: TE's FP8 layers recast their weights
            return self.m(x, positions, None, labels=labels).float().mean()

    return bench(Loss(), T, steps, warmup, vocab, profile=profile, base_bytes=base_bytes)


def row_of(T: int, name: str, S, r: dict, flops: float, gpus: int = 1) -> dict:
    row = dict(T=T, variant=name, S=S, step_s=r["step_s"], tokens_per_s=T / r["step_s"], peak_gib=r["peak_gib"],
               mfu=flops / r["step_s"] / H100_BF16_DENSE / gpus, model_tflops=flops / r["step_s"] / 1e12,
               first_loss=r["losses"][0], last_loss=r["losses"][-1])  # fmt: skip
    for key in ("phases_s", "kernels_s", "top_kernels", "leftover_gib"):
        if key in r:
            row[key] = r[key]
    return row


def write(args, meta: dict, rows: list[dict]) -> None:
    for T in {r["T"] for r in rows}:
        at_T = [r for r in rows if r["T"] == T]
        for r in at_T:
            r["speedup"] = r["tokens_per_s"] / at_T[0]["tokens_per_s"]
    write_text_atomic(os.path.join(args.out, "bench_train.json"), json.dumps(dict(meta=meta, rows=rows), indent=1))


def plot(args, rows: list[dict]) -> None:
    plt = pyplot()
    if plt is None:
        print("(no matplotlib: no plot)")
        return
    lengths = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4), squeeze=False)
    for ax, T in zip(axes[0], lengths):
        at_T = [r for r in rows if r["T"] == T]
        bars = ax.barh([r["variant"] for r in at_T], [r["tokens_per_s"] / 1e3 for r in at_T])
        ax.bar_label(bars, labels=[f"{r['mfu']:.0%} MFU, {r['peak_gib']:.1f} GiB" for r in at_T], fontsize=8)
        ax.set_xlabel("K tokens/s")
        ax.set_title(f"T={T}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "bench_train.png"), dpi=120)


def print_tables(meta: dict, rows: list[dict]) -> None:
    print(f"\n{meta}\n")
    print("| T | variant | S | step s | tokens/s | speedup | peak GiB | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['T']} | {r['variant']} | {r['S'] or '-'} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['speedup']:.2f}x | {r['peak_gib']:.1f} | {r['model_tflops']:.0f} | {r['mfu']:.1%} |"
        )
    profiled = [r for r in rows if "kernels_s" in r]
    if not profiled:
        return
    cats = list(dict.fromkeys(c for r in profiled for c in list(r["phases_s"]) + list(r["kernels_s"])))
    print("\nms per step (phases from CUDA events; kernels by category from torch.profiler; idle: no kernel running)\n")
    print("| T | variant | " + " | ".join(cats) + " |")
    print("|---|---|" + "---|" * len(cats))
    for r in profiled:
        both = {**r["phases_s"], **r["kernels_s"]}
        print(f"| {r['T']} | {r['variant']} | " + " | ".join(f"{both.get(c, 0) * 1e3:.0f}" for c in cats) + " |")


def run_portable(args, variant: dict, T: int) -> dict:
    torch.cuda.synchronize()
    base_bytes = torch.cuda.memory_allocated()
    model, cfg = build_variant(args, variant, T)
    r = bench(model, T, args.steps, args.warmup, cfg.vocab_size, profile=args.profile, base_bytes=base_bytes,
              fused_loss=variant["fused_loss"])  # fmt: skip
    causal = variant["base"] == "causal"
    row = row_of(T, variant["name"], None if causal else args.segment_size, r, model_flops_per_step(model, T, causal))
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return row


def run_megatron(args, fp8: bool, fused: bool, T: int, tp: int) -> dict:
    cfg = bench_config(args, T, args.megatron_backend)
    torch.manual_seed(0)
    torch.cuda.synchronize()
    base_bytes = torch.cuda.memory_allocated()  # an earlier variant's leftovers do not count
    model = megatron_model(cfg, tp, fp8, fused)
    r = megatron_bench(model, T, args.steps, args.warmup, cfg.vocab_size, args.profile and tp == 1, base_bytes)
    with torch.device("meta"):
        flops = model_flops_per_step(LlamaForCausalLM(cfg), T, causal=False)
    name = f"megatron TP={tp} ({args.megatron_backend}{', FP8' if fp8 else ''}{'' if fused else ', unfused'})"
    del model
    torch.cuda.empty_cache()
    return row_of(T, name, args.segment_size, r, flops, gpus=tp)


def run_isolated(args, n_jobs: int, meta: dict) -> list[dict]:
    """Each variant in a fresh process (``--only i``): its peak memory is its own, whatever ran before."""
    rows = []
    for i in range(n_jobs):
        with tempfile.TemporaryDirectory() as tmp:
            argv = [a for a in sys.argv[1:] if a != "--isolate"] + ["--only", str(i), "--out", tmp]
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=False)
            path = os.path.join(tmp, "bench_train.json")
            if done.returncode != 0 or not os.path.exists(path):
                print(f"variant {i} failed (exit {done.returncode})", flush=True)
                continue
            with open(path) as f:
                rows += json.load(f)["rows"]
            write(args, meta, rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="configs/model/llama3.2-1b.yaml")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--segment-size", type=int, default=4096)
    ap.add_argument("--fraction-all", type=float, default=0.25)
    ap.add_argument("--variants", nargs="*", default=["causal", "flex", "flash", "flash+compile"],
                    help="causal | flex | flash, each with +compile, +acN, +kaN (the first is the speedup's base)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiled variants compile here)")
    ap.add_argument("--profile", action="store_true", help="also phases and kernel time by category, per variant")
    ap.add_argument("--out", default="runs/bench_train")
    ap.add_argument("--megatron", action="store_true", help="also the megatron-core model, TP = number of processes")
    ap.add_argument("--megatron-backend", default="flex", help="its segment attention backend (flex, flash)")
    ap.add_argument("--megatron-fp8", action="store_true", help="also the megatron model with FP8 GEMMs (Transformer Engine)")
    ap.add_argument("--megatron-unfused", action="store_true",
                    help="also the megatron model(s) without megatron's fused elementwise kernels")  # fmt: skip
    ap.add_argument("--isolate", action="store_true",
                    help="run each variant in a fresh process (peak memory unaffected by the variants before it)")  # fmt: skip
    ap.add_argument("--only", type=int, help=argparse.SUPPRESS)  # --isolate's child: run job i only
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    if args.isolate and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ap.error("--isolate runs on one GPU (a torchrun job shares its process group across variants)")
    tp, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if (args.megatron or tp > 1) and not args.isolate:
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29555")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), processes=tp, torch=torch.__version__, shape=args.shape,
                fraction_all=args.fraction_all, batch=1, dtype="bfloat16", steps=args.steps, warmup=args.warmup)  # fmt: skip
    megatron_variants = [(fp8, fused) for fused in ([False, True] if args.megatron_unfused else [True])
                         for fp8 in ([False, True] if args.megatron_fp8 else [False])] if args.megatron else []  # fmt: skip
    jobs = [(T, "portable", v) for T in args.lengths for v in variants] + [
        (T, "megatron", m) for T in args.lengths for m in megatron_variants
    ]
    jobs.sort(key=lambda job: job[0])  # by length, the single-GPU variants first
    rows = []
    if args.isolate:
        rows = run_isolated(args, len(jobs), meta)
    for i, (T, kind, what) in enumerate(jobs):
        if args.isolate or (args.only is not None and i != args.only):
            continue
        row = run_portable(args, what, T) if kind == "portable" and rank == 0 else None
        if kind == "megatron":
            if tp > 1:
                dist.barrier()  # the other ranks waited while rank 0 ran the single-GPU variants
            row = run_megatron(args, *what, T, tp)
        if row is not None and rank == 0:
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
            write(args, meta, rows)
    if rank != 0:
        return
    write(args, meta, rows)
    if args.only is not None:
        return  # an --isolate child: its parent draws the table
    plot(args, rows)
    print_tables(meta, rows)


if __name__ == "__main__":
    main()
