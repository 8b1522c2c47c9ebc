"""How to cut the split-KV decoding kernel: a sweep of its launch choices at real decoding shapes, timed on the GPU.

The kernel (``segtrain/kernels/decode_attention.py``) gives the same result for every :class:`Launch` (slots per inner
iteration, warps, pipeline stages, programs per SM); only the speed differs. For each case (a model shape's policy
table, a prompt length, a batch) this fills one cache per layer with random K/V, as the engine lays them out, and
times one decoding step's attention over every layer: the ``num_layers`` calls captured in one CUDA graph, replayed,
timed with CUDA events, so that launch gaps count as they do in the engine's graph-captured step. The K/V the step
must read over the copy bandwidth measured in the same run is the bound; ``fraction`` = bound / time. Every launch's
output is compared with the default's (they must agree to bf16 rounding).

Prints a table per case and the launch with the lowest total time over the cases as one line
``SEGTRAIN_DECODE_KERNEL=...`` (the kernel's override: end-to-end benches in the same run can use it). Writes
``tune_decode_attention.json`` into ``--out``.

    python tools/tune_decode_attention.py --out $OUT/tune                     # 8B shape: 128K and 32K, batch 1 and 16
    python tools/tune_decode_attention.py --blocks 64 --warps 4 --stages 2,3   # a narrower sweep
    python tools/tune_decode_attention.py --blocks 64 --warps 4 --stages 3 --per-sm 2 --merge 0,1   # merge after or in
    python tools/tune_decode_attention.py --smoke                              # CPU, Triton's interpreter: checks the script
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from functools import partial
from pathlib import Path

GIB = 2**30
CASES = "128K:1:all25,128K:1:none,32K:1:all25,32K:16:all25"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", help="model flavor (its layers, heads and head size)")
    p.add_argument("--cases", default=CASES, help="prompt:batch:policy, comma-separated; policies: bench_decode's (all25, none)")
    p.add_argument("--segment-size", type=int, default=4096)
    p.add_argument("--blocks", default="64,128", help="slots per inner iteration")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4")
    p.add_argument("--per-sm", default="2,4,8,16", help="programs per SM")
    p.add_argument(
        "--store",
        default="1",
        help="1: the kernel stores the step's K/V; 0: the cache holds them already (its two store launches not timed)",
    )
    p.add_argument("--merge", default="0", help="1: the last split merges, in the same launch; 0: a second launch merges")
    p.add_argument("--replays", type=int, default=20, help="timed replays of each graph")
    p.add_argument("--budget-s", type=float, default=240.0, help="start no new launch after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU in Triton's interpreter: checks the script")
    p.add_argument("--out", default="runs/tune_decode_attention")
    args = p.parse_args(argv)
    if args.replays < 1:
        p.error(f"--replays must be at least 1 (got {args.replays})")
    return args


def _ints(text: str, flag: str, switch: bool = False) -> list[int]:
    """``"2,4"`` -> ``[2, 4]``: positive integers, or with ``switch`` each 0 or 1."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    if switch and (not values or set(values) - {0, 1}):
        raise SystemExit(f"{flag}: {text!r} needs a comma-separated list of 0 and 1")
    if not switch and (not values or min(values) < 1):
        raise SystemExit(f"{flag}: {text!r} needs positive integers")
    return values


def parse_cases(text: str) -> list[tuple[int, int, str]]:
    from bench_decode import POLICIES
    from bench_prefill import _length

    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[2] not in POLICIES or not parts[1].isdigit():
            raise SystemExit(f"--cases: {item!r} is not prompt:batch:policy with a policy of {sorted(POLICIES)}")
        cases.append((_length(parts[0]), int(parts[1]), parts[2]))
    return cases


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:  # before Triton is first imported (bench_decode imports the kernel)
        os.environ["TRITON_INTERPRET"] = "1"
    cases = [(300, 2, "all25"), (300, 1, "none")] if args.smoke else parse_cases(args.cases)
    names = ("blocks", "warps", "stages", "per_sm", "store", "merge")
    sweep = {n: _ints(getattr(args, n), f"--{n.replace('_', '-')}", switch=n in ("store", "merge")) for n in names}
    import torch
    from bench_decode import POLICIES, SMOKE_SHAPE, _k, _timed, copy_bandwidth, kv_bytes_seen

    from segtrain.config import load_model_config
    from segtrain.inference import SegmentKVCache
    from segtrain.kernels.decode_attention import Launch, decode_attention
    from segtrain.policy import PolicyTable

    if args.smoke:
        from segtrain.compat.triton import patch_interpreter_scalars

        patch_interpreter_scalars()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tune_decode_attention needs a CUDA GPU (or --smoke to check the script on CPU)")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    S = 64 if args.smoke else args.segment_size
    launches = [Launch()] + [
        launch
        for b, w, s, p, store, merge in itertools.product(*sweep.values())
        if (launch := Launch(block=b, warps=w, stages=s, per_sm=p, store=store, merge=merge)) != Launch()
    ]
    if args.smoke:
        launches = launches[:3]
    fields = {**(SMOKE_SHAPE if args.smoke else {}), "segment_size": S}
    config = load_model_config("tiny" if args.smoke else args.shape, fields)
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; {len(launches)} launches x {len(cases)} cases", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results = []
    for prompt, batch, policy in cases:
        policies = PolicyTable.from_spec(POLICIES[policy], config.num_layers, config.num_kv_heads)
        cache = SegmentKVCache(policies, batch_size=batch, max_length=prompt + 64, segment_size=S, num_heads=config.num_heads,
                               head_dim=config.head_dim, dtype=dtype, device=device, decode_attention="triton")  # fmt: skip
        for t in cache.tensors():
            t.normal_()
        positions = torch.full((batch,), prompt, dtype=torch.long, device=device)
        q = torch.randn(batch, config.num_heads, config.head_dim, dtype=dtype, device=device)
        scale = config.head_dim**-0.5
        counters = torch.zeros(batch * config.num_kv_heads, dtype=torch.int32, device=device)  # the cache's, in the engine
        k_new, v_new = (torch.randn(batch, config.num_kv_heads, config.head_dim, dtype=dtype, device=device) for _ in "kv")
        kv_bytes = batch * kv_bytes_seen(config, policies, prompt, torch.finfo(dtype).bits // 8)
        bound_ms = 1e3 * kv_bytes / bandwidth
        label = f"{_k(prompt)} B{batch} {policy}"

        def step(launch, cache=cache, q=q, positions=positions, scale=scale, counters=counters, new=(k_new, v_new)):
            stored = new if launch.store else (None, None)  # what the engine hands the kernel (store=0: stored before)
            return [
                decode_attention(q, lay.k, lay.v, positions, lay.heads, max_capacity=lay.max_capacity,
                                 total_slots=sum(x.capacity for x in lay.layouts), segment_size=S, scale=scale, launch=launch,
                                 counters=counters, k_new=stored[0], v_new=stored[1])
                for lay in cache.layers
            ]  # fmt: skip

        reference = None
        for launch in launches:
            row = {"case": label, "prompt": prompt, "batch": batch, "policy": policy, "launch": launch.spec(),
                   "kv_gb": kv_bytes / 1e9, "bound_ms": bound_ms}  # fmt: skip
            if time.perf_counter() - t_start > args.budget_s:
                row["skipped"] = "time budget"
                results.append(row)
                continue
            try:
                outs = step(launch)  # compiles
                run = partial(step, launch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        outs = step(launch)
                    run = graph.replay  # refills outs
                row["ms"] = 1e3 * _timed(run, args.replays if device.type == "cuda" else 1, 1, device)
                first = outs[0].float()
                if reference is None:
                    reference = first
                row["max_diff_vs_default"] = (first - reference).abs().max().item()
                row["fraction"] = bound_ms / row["ms"]
            except Exception as e:  # a launch that cannot compile here (shared memory, registers) is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            results.append(row)
        print_case(label, [r for r in results if r["case"] == label], bound_ms)
        del cache, q
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = best_launch(results, len(cases))
    summary = {"device": name, "copy_bandwidth": bandwidth, "shape": args.shape, "segment_size": S, "best": best,
               "default": Launch().spec(), "rows": results}  # fmt: skip
    tmp = out_dir / "tune_decode_attention.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out_dir / "tune_decode_attention.json")
    print(f"\njson: {out_dir / 'tune_decode_attention.json'} ({time.perf_counter() - t_start:.0f} s)")
    if best:
        print(f"best over the cases: {best['launch']}: {best['total_ms']:.3f} ms against the default's "
              f"{best['default_total_ms']:.3f} ms ({best['default_total_ms'] / best['total_ms']:.2f}x)")  # fmt: skip
        print(f"SEGTRAIN_DECODE_KERNEL={best['launch']}")
    return 0


def print_case(label: str, rows: list[dict], bound_ms: float) -> None:
    done = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    print(f"\n{label}: bound {bound_ms:.3f} ms for {rows[0]['kv_gb']:.2f} GB of K/V over all layers")
    print("| launch | ms (all layers) | fraction of bound | max diff vs default |")
    print("| --- | --- | --- | --- |")
    default = next((r for r in rows if r["launch"] == rows[0]["launch"] and "ms" in r), None)
    for r in done[:5] + ([default] if default and default not in done[:5] else []):
        print(f"| {r['launch']}{' (default)' if r is default else ''} | {r['ms']:.3f} | {r['fraction']:.2f} | "
              f"{r['max_diff_vs_default']:.1e} |")  # fmt: skip
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"({len(failed)} launches failed, e.g. {failed[0]['launch']}: {failed[0]['error']})")


def best_launch(results: list[dict], n_cases: int) -> dict | None:
    """The launch with the lowest summed time over every case (only launches timed in all of them, agreeing with the
    default to bf16 rounding)."""
    totals: dict[str, list[float]] = {}
    for r in results:
        if "ms" in r and r["max_diff_vs_default"] <= 2e-2:
            totals.setdefault(r["launch"], []).append(r["ms"])
    complete = {k: sum(v) for k, v in totals.items() if len(v) == n_cases}
    if not complete:
        return None
    first = results[0]["launch"]  # the default is timed first in every case
    launch = min(complete, key=complete.get)
    return {"launch": launch, "total_ms": complete[launch], "default_total_ms": complete.get(first, math.nan)}


if __name__ == "__main__":
    raise SystemExit(main())
