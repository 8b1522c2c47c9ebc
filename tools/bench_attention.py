"""Segment attention (flex backend) against full causal SDPA-flash: time, peak memory, TFLOP/s.

    python tools/bench_attention.py --out $OUT/bench_attention

Forward-only (under no_grad) and forward+backward, batch 1, GQA, bf16. FLOPs count visible keys
only: forward 4*D per (query head, visible key) pair, forward+backward 3.5x that (FlashAttention's
convention). The dense baseline runs in the same process on the same inputs. Prints a markdown table
and writes JSON.

``--te-causal`` adds Transformer Engine's own full causal attention (``DotProductAttention``) in BF16
and in FP8 (``DelayedScaling(fp8_dpa=True)``) as baselines: what FP8 gains on TE's kernels alone.
``--dense cudnn fa4`` adds full causal baselines on other kernels: SDPA's cuDNN backend and flash-attn-4's own
``flash_attn_func`` (``flash_attn.cute``), to compare the kernels themselves at a head size (the backward at 64).
Every implementation also gets a ``bwd`` row: its forward+backward time less its forward time.
``--profile`` adds, per segtrain backend, one forward+backward under torch.profiler: GPU time by
kernel, the top ones printed and written to the JSON (where a backend's time goes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from segtrain.attention import segment_attention
from segtrain.attention.flex import BLOCK, segment_block_mask
from segtrain.policy import PolicyTable, visible_pairs

GiB = 2**30


def measure(fn, *, backward: bool, inputs, grad_out):
    """Median ms (CUDA events via do_bench) and peak bytes beyond what is allocated before the call."""

    def step():
        if backward:
            out = fn()
            torch.autograd.backward(out, grad_out)
            for t in inputs:
                t.grad = None
        else:
            with torch.no_grad():
                fn()

    step()  # compile / warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(step, warmup=50, rep=300, return_mode="median")
    return ms, peak


def sdpa_causal(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def cudnn_causal(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def fa4_causal(q, k, v):
    """flash-attn-4's own causal kernel, ``[B, T, H, D]`` (GQA native)."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v, causal=True)
    return out[0] if isinstance(out, tuple) else out


def te_causal(fp8: bool, heads: int, kv_heads: int, dim: int):
    """TE's ``DotProductAttention``, causal, ``bshd``; FP8 under ``DelayedScaling(fp8_dpa=True)``."""
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    dpa = te.DotProductAttention(heads, dim, num_gqa_groups=kv_heads, qkv_format="bshd", attn_mask_type="causal")
    recipe = DelayedScaling(fp8_dpa=True) if fp8 else None

    def run(q, k, v):
        with te.fp8_autocast(enabled=fp8, fp8_recipe=recipe):
            return dpa(q, k, v)

    return run


def kernel_profile(fn, inputs, grad_out, top: int = 12) -> list[dict]:
    """GPU time by kernel name over one forward+backward (after a warm-up), largest first."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        torch.autograd.backward(fn(), grad_out)
        for t in inputs:
            t.grad = None

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_name: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = by_name.setdefault(e.name, [0.0, 0])
            entry[0] += e.time_range.elapsed_us() / 1e3
            entry[1] += 1
    total = sum(ms for ms, _ in by_name.values())
    rows = [dict(kernel=n[:90], ms=ms, calls=c) for n, (ms, c) in by_name.items()]
    rows.sort(key=lambda r: -r["ms"])
    return [dict(kernel="(all kernels)", ms=total, calls=sum(c for _, c in by_name.values()))] + rows[:top]


def dense_row(T: int, impl: str, mode: str, ms: float, peak: int, flops_fwd: float, base: dict | None = None) -> dict:
    """One full causal attention row (printed as it comes); ``speedup`` against ``base``'s time of the same mode."""
    flops = flops_fwd * (3.5 if mode != "fwd" else 1.0)
    row = dict(T=T, S=None, all_frac=None, impl=impl, mode=mode, ms=ms, peak_gib=peak / GiB, tflops=flops / ms / 1e9)
    if base is not None:
        row["speedup"] = base[mode] / ms
    print(json.dumps(row), flush=True)
    return row


def bench_length(T: int, args, rows: list, profiles: list) -> None:
    """All cases at one sequence length; the dense baseline first, on the same inputs."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    G = args.heads // args.kv_heads
    g = torch.Generator(device=dev).manual_seed(T)
    q = torch.randn(1, args.heads, T, args.dim, device=dev, dtype=dt, generator=g, requires_grad=True)
    k = torch.randn(1, args.kv_heads, T, args.dim, device=dev, dtype=dt, generator=g, requires_grad=True)
    v = torch.randn(1, args.kv_heads, T, args.dim, device=dev, dtype=dt, generator=g, requires_grad=True)
    grad_out = torch.randn_like(q)
    causal_pairs = args.heads * T * (T + 1) / 2
    # Baseline: SDPA-flash, with native GQA and with K/V expanded to every query head beforehand
    # (outside the timing); the speedup is taken against the faster of the two.
    k_x, v_x = (t.detach().repeat_interleave(G, 1).requires_grad_() for t in (k, v))
    flops_fwd = 4 * args.dim * causal_pairs
    base = {}
    for label, kk, vv in (("sdpa-flash causal, gqa", k, v), ("sdpa-flash causal, kv expanded", k_x, v_x)):
        for mode in ("fwd", "fwd+bwd"):
            ms, peak = measure(
                lambda kk=kk, vv=vv: sdpa_causal(q, kk, vv), backward=mode != "fwd", inputs=(q, kk, vv), grad_out=grad_out
            )
            base[mode] = min(base.get(mode, math.inf), ms)
            rows.append(dense_row(T, label, mode, ms, peak, flops_fwd))
    for r in rows:
        if r["T"] == T and r["S"] is None:
            r["speedup"] = base[r["mode"]] / r["ms"]
    # [B, T, H, D] copies for the kernels that take that layout (flash_attn_func, TE's bshd), made once for both
    qb = kb = vb = gb = None
    if "fa4" in args.dense or args.te_causal:
        qb, kb, vb = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        gb = grad_out.transpose(1, 2).contiguous()
    for dense in args.dense:
        kernel = {"cudnn": cudnn_causal, "fa4": fa4_causal}[dense]
        forms = [(qb, kb, vb, gb)] if dense == "fa4" else [(q, k, v, grad_out), (q, k_x, v_x, grad_out)]  # cuDNN: GQA or not
        for mode in ("fwd", "fwd+bwd"):
            for qq, kk, vv, g_out in forms:
                try:
                    ms, peak = measure(partial(kernel, qq, kk, vv), backward=mode != "fwd", inputs=(qq, kk, vv), grad_out=g_out)
                except Exception as e:  # a kernel that cannot run this shape here is reported, not fatal
                    print(f"{dense} causal {mode} T={T} (kv {tuple(kk.shape)}) failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                rows.append(dense_row(T, f"{dense} causal", mode, ms, peak, flops_fwd, base))
                break
    del k_x, v_x
    if args.te_causal:
        for fp8 in (False, True):
            run = te_causal(fp8, args.heads, args.kv_heads, args.dim)
            for mode in ("fwd", "fwd+bwd"):
                try:
                    ms, peak = measure(partial(run, qb, kb, vb), backward=mode != "fwd", inputs=(qb, kb, vb),
                                       grad_out=gb.reshape(1, T, -1))  # fmt: skip
                except Exception as e:
                    print(f"te causal fp8={fp8} {mode} T={T} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append(dense_row(T, f"te causal {'fp8' if fp8 else 'bf16'}", mode, ms, peak, flops_fwd, base))
    del qb, kb, vb, gb
    for S in args.segments:
        for frac in args.fractions:
            policies = PolicyTable.from_spec({"fraction": frac}, 1, args.kv_heads)[0]
            t0 = time.perf_counter()
            segment_block_mask(math.ceil(T / BLOCK) * BLOCK, S, tuple(policies), G, str(dev))
            torch.cuda.synchronize()
            mask_ms = (time.perf_counter() - t0) * 1e3
            pairs = visible_pairs(T, S, policies) * G

            for backend in args.backends:

                def fn(S=S, policies=policies, backend=backend):
                    return segment_attention(q, k, v, segment_size=S, policy=policies, backend=backend)

                for mode in ("fwd", "fwd+bwd"):
                    try:
                        ms, peak = measure(fn, backward=mode != "fwd", inputs=(q, k, v), grad_out=grad_out)
                    except Exception as e:  # a backend that cannot run here is reported, not fatal
                        print(f"{backend} {mode} T={T} S={S} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    flops = 4 * args.dim * pairs * (3.5 if mode != "fwd" else 1.0)
                    rows.append(
                        dict(
                            T=T,
                            S=S,
                            all_frac=frac,
                            impl=f"segtrain {backend}",
                            mode=mode,
                            ms=ms,
                            peak_gib=peak / GiB,
                            tflops=flops / ms / 1e9,
                            speedup=base[mode] / ms,
                            mask_build_ms=mask_ms,
                            visible_frac=pairs / causal_pairs,
                        )
                    )
                    print(json.dumps(rows[-1]), flush=True)
                if args.profile:
                    try:
                        kernels = kernel_profile(fn, (q, k, v), grad_out)
                    except Exception as e:
                        print(f"{backend} profile T={T} S={S} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    profiles.append(dict(T=T, S=S, all_frac=frac, impl=f"segtrain {backend}", kernels=kernels))
    segment_block_mask.cache_clear()
    add_backward_rows(rows, T)


def add_backward_rows(rows: list, T: int) -> None:
    """Per implementation at ``T``: a ``bwd`` row, its forward+backward time less its forward time (2.5x the forward's
    FLOPs: the backward's five matmuls to the forward's two)."""
    timed = {(r["S"], r["all_frac"], r["impl"], r["mode"]): r for r in rows if r["T"] == T and r["mode"] != "bwd"}
    for (S, frac, impl, mode), r in list(timed.items()):
        fwd = timed.get((S, frac, impl, "fwd"))
        if mode != "fwd+bwd" or fwd is None or r["ms"] <= fwd["ms"]:
            continue
        ms = r["ms"] - fwd["ms"]
        flops_fwd = fwd["tflops"] * fwd["ms"] * 1e9
        rows.append({**r, "mode": "bwd", "ms": ms, "tflops": 2.5 * flops_fwd / ms / 1e9, "speedup": math.nan})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--segments", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 1.0], help="fraction of KV heads 'all'")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--backends", nargs="+", default=["flex"], help="segtrain backends to time (flex, flash, te, te-fp8)")
    ap.add_argument("--dense", nargs="*", default=[], choices=["cudnn", "fa4"],
                    help="also full causal attention on SDPA's cuDNN backend and flash-attn-4's flash_attn_func")  # fmt: skip
    ap.add_argument("--te-causal", action="store_true", help="also TE's full causal attention, BF16 and FP8")
    ap.add_argument("--profile", action="store_true", help="also GPU time by kernel, per segtrain backend")
    ap.add_argument("--out", default="runs/bench_attention")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    profiles: list[dict] = []
    for T in args.lengths:
        bench_length(T, args, rows, profiles)
        torch.cuda.empty_cache()
    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        heads=args.heads,
        kv_heads=args.kv_heads,
        dim=args.dim,
        dtype="bfloat16",
        batch=1,
    )
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, profiles=profiles), f, indent=1)
    for p in profiles:
        print(f"\nGPU time by kernel, {p['impl']}, T={p['T']}, S={p['S']}, {p['all_frac']:.0%} all, one fwd+bwd:")
        for r in p["kernels"]:
            print(f"  {r['ms']:8.2f} ms {r['calls']:5d}x  {r['kernel']}")
    print(f"\n{meta}\n")
    print("| T | S | all heads | impl | mode | ms | speedup vs best SDPA | peak GiB | TFLOP/s (visible) | visible keys |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        frac = "-" if r["all_frac"] is None else f"{r['all_frac']:.0%}"
        vis = f"{r.get('visible_frac', 1.0):.2f}"
        speedup = "-" if math.isnan(r["speedup"]) else f"{r['speedup']:.2f}x"
        print(
            f"| {r['T']} | {r['S'] or '-'} | {frac} | {r['impl']} | {r['mode']} | {r['ms']:.2f} | {speedup} | "
            f"{r['peak_gib']:.2f} | {r['tflops']:.0f} | {vis} |"
        )


if __name__ == "__main__":
    main()
