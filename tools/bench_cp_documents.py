"""Context-parallel attention in document mode: one FlexAttention call per rank against the per-document loop.

    torchrun --nproc-per-node 2 tools/bench_cp_documents.py --out $OUT/bench_cp_documents     # 1B attention shape
    torchrun --nproc-per-node 2 tools/bench_cp_documents.py --tokens-per-gpu 65536 --mean 2048 --out $OUT/bcd
    torchrun --nproc-per-node 2 tools/bench_cp_documents.py --device cpu --tiny --out /tmp/bcd   # smoke test (gloo)

One attention layer (Hq=32, Hkv=8, head dim 64, bf16, segment size ``--segment-size``, 25% of KV heads ``all``, the
rest ``sink:64+window:4096`` and ``none``) over one sequence of ``world x --tokens-per-gpu`` tokens packed from a
seeded long-tailed mix of document lengths (lognormal, mean ``--mean``). Rows: ``documents/flex`` (the one-call form),
``documents/loop`` (the segment loop per document piece, what CP ran before), ``stream/flex`` (one stream, same tokens,
for reference). Forward + backward: median time over ``--steps`` after ``--warmup`` (the slowest rank), peak memory.
The document mask is built once per forward (a fresh ``Documents`` per step), so its build is in the time.
Writes OUT/bench_cp_documents.json after every row (temp file, then rename). On CPU the flex form is unavailable:
every row runs the loop (the script's smoke test only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time

import torch
import torch.distributed as dist

from segtrain.attention import Documents
from segtrain.checkpoint.atomic import write_text_atomic
from segtrain.parallel import context_parallel_ranges, context_parallel_segment_attention

ROWS = (("documents", "flex"), ("documents", "math"), ("stream", "flex"))


def document_positions(total: int, mean: float, seed: int, shortest: int = 64) -> torch.Tensor:
    """In-document positions ``[1, total]`` of seeded long-tailed documents (lognormal, sigma 1, mean ``mean``)."""
    rng, mu = random.Random(seed), math.log(mean) - 0.5
    parts, n = [], 0
    while n < total:
        length = min(total - n, max(shortest, round(rng.lognormvariate(mu, 1.0))))
        parts.append(torch.arange(length))
        n += length
    return torch.cat(parts)[None]


def time_row(args, mode: str, backend: str, qkv, positions, ranges, device) -> dict:
    rank = dist.get_rank()
    lo, hi = ranges[rank]
    policies = (["all"] * 2 + ["sink:64+window:4096"] * 3 + ["none"] * 3)[: qkv[1].shape[1]]
    times = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        documents = Documents.from_position_ids(positions[:, lo:hi]) if mode == "documents" else None
        q, k, v = (t.detach().requires_grad_() for t in qkv)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = context_parallel_segment_attention(q, k, v, segment_size=args.segment_size, policy=policies, ranges=ranges,
                                                 backend=backend, documents=documents)  # fmt: skip
        out.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    stats = torch.tensor([statistics.median(times), peak], device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank, the largest peak
    return {"mode": mode, "backend": backend, "seconds": round(float(stats[0]), 4), "peak_gib": round(float(stats[1]), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-per-gpu", type=int, default=32768)
    ap.add_argument("--segment-size", type=int, default=4096)
    ap.add_argument("--mean", type=float, default=4096, help="mean document length")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small sizes (a CPU smoke test)")
    ap.add_argument("--out", default="runs/bench_cp_documents")
    args = ap.parse_args()
    hq, hkv, d = (4, 2, 8) if args.tiny else (32, 8, 64)
    if args.tiny:
        args.tokens_per_gpu, args.segment_size, args.mean, args.steps, args.warmup = 256, 16, 40, 1, 0
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    total = world * args.tokens_per_gpu
    ranges = context_parallel_ranges(total, args.segment_size, world)
    positions = document_positions(total, args.mean, seed=0)
    g = torch.Generator().manual_seed(rank)
    dtype = torch.bfloat16 if cuda else torch.float32
    lo, hi = ranges[rank]
    qkv = [torch.randn(1, h, hi - lo, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv)]
    meta = {"world": world, "tokens": total, "segment_size": args.segment_size, "documents": int((positions == 0).sum())}
    rows = []
    for mode, backend in ROWS:
        rows.append(time_row(args, mode, backend, qkv, positions, ranges, device))
        if rank == 0:
            print(f"{mode:10s} {backend:5s} {rows[-1]['seconds']:8.4f} s  peak {rows[-1]['peak_gib']:6.2f} GiB", flush=True)
            os.makedirs(args.out, exist_ok=True)
            write_text_atomic(os.path.join(args.out, "bench_cp_documents.json"), json.dumps({**meta, "rows": rows}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
