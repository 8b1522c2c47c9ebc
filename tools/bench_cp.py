"""Context parallelism by segments: step time, peak memory, communication and history offload per GPU.

    torchrun --nproc-per-node 2 tools/bench_cp.py --shape configs/model/llama3.2-1b.yaml --tokens-per-gpu 65536 --out OUT
    torchrun --nproc-per-node 2 tools/bench_cp.py --megatron ...   # the megatron-core model (TP = PP = 1)

Weak scaling: every GPU holds ``--tokens-per-gpu`` tokens on average, so CP=c trains one sequence of
``c x tokens-per-gpu`` tokens. Configurations (one process group per CP size, all in one launch):
CP=1 (each rank alone, the same CP operator over a group of one), CP=c with the even split, CP=c with
the balanced uneven split (:func:`segtrain.parallel.balanced_ranges`), the balanced split capped at
``--balance-cap`` x the even share per rank (``capped``: bounds the first rank's memory), and each with
history offload (``+offload``).
One step = forward, backward, gradient all-reduce over the CP group, AdamW, on bf16 weights, batch 1,
no activation checkpointing (offload needs the saved history). Reported per configuration: median
step time, the slowest rank's peak memory, tokens/s per GPU, weak-scaling efficiency (CP=1 step time
over CP=c step time: 1.0 means a c-times longer sequence costs nothing extra per GPU), the same
normalised by model FLOPs (a longer sequence has more history to attend to), bytes each rank sends
per step (formula of :func:`segtrain.parallel.exchange_bytes`, counted at run time), and offloaded /
hidden history bytes. Works on CPU with gloo at tiny sizes (``--device cpu``), for testing.

``--megatron``: the megatron-core model (``models/megatron.py``) instead of the portable one, with
megatron's ``parallel_state`` holding the CP group as in training (``parallel.cp`` with
``model_impl: megatron``); the loss is each model's training recipe's per-token loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from segtrain.config import load_model_config
from segtrain.loss import shard_share
from segtrain.parallel import (
    ExchangeBytes,
    HistoryOffload,
    apply_context_parallel,
    balanced_ranges,
    context_parallel_ranges,
    imbalance,
    model_segment_costs,
    shard_batch,
)
from segtrain.parallel.context_flex import clear_mask_cache
from segtrain.plotting import pyplot

GiB = 2**30


def model_flops(cfg, T: int) -> float:
    """Forward + backward model FLOPs of one sequence of ``T`` tokens (3 x the forward cost model)."""
    return 3 * sum(model_segment_costs(cfg, T))


def run_config(model, recipe, cfg, args, group, ranges, offload: bool, device) -> dict:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    stats = ExchangeBytes()
    off = HistoryOffload() if offload else None
    apply_context_parallel(model, group, ranges, stats=stats, offload=off)
    T = ranges[-1][1]
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, cfg.vocab_size, (1, T + 1), generator=g).to(device)
    batch = shard_batch({"tokens": ids[:, :-1], "labels": ids[:, 1:]}, ranges, rank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            stats.carry = stats.history = stats.carry_grad = 0
            if off is not None:
                off.settle()
                off.stats.__init__()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier(group)
        t0 = time.perf_counter()
        loss = shard_share(recipe.per_token_loss(model, batch), batch["labels"], None, group)
        if device.type == "cuda":
            held = torch.cuda.memory_allocated()  # what forward keeps for backward (and the weights, grads, Adam)
        loss.backward()
        if world > 1:  # replicated parameters: gradients summed over the CP group (the DP x CP reduce)
            grads = [p.grad for p in model.parameters()]
            flat = torch.cat([x.reshape(-1) for x in grads])
            dist.all_reduce(flat, group=group)
            offset = 0
            for x in grads:
                x.copy_(flat[offset : offset + x.numel()].view_as(x))
                offset += x.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        total = loss.detach().float().clone()
        dist.all_reduce(total, group=group)
        losses.append(total.item())
    peak = torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else 0.0
    after_forward = held / GiB if device.type == "cuda" else 0.0
    off_stats = off.settle() if off is not None else None
    steps = args.steps
    return dict(
        step_s=statistics.median(times),
        peak_gib=peak,
        after_forward_gib=after_forward,
        bytes_sent_per_step=(stats.carry + stats.history + stats.carry_grad) // steps,
        history_bytes_per_step=stats.history // steps,
        offloaded_bytes_per_step=off_stats.offloaded // steps if off_stats else 0,
        hidden_bytes_per_step=off_stats.hidden // steps if off_stats else 0,
        waited_bytes_per_step=off_stats.waited // steps if off_stats else 0,
        loss=losses[-1],
    )


def build_model(cfg, megatron: bool, device, world: int):
    """The model (bf16 on CUDA, float32 on CPU), its training recipe (for the per-token loss) and the CP group of
    the whole world: megatron's, from its ``parallel_state`` initialized with CP = world, as training does."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not megatron:
        from segtrain.models.llama import LlamaForCausalLM
        from segtrain.train.recipes.portable import PortableRecipe

        with torch.device(device):
            return LlamaForCausalLM(cfg).to(dtype), PortableRecipe(), dist.group.WORLD
    from megatron.core import parallel_state as ps

    from segtrain.models.megatron import build_gpt_model, init_model_parallel
    from segtrain.train.recipes.megatron import MegatronRecipe

    init_model_parallel(1, 1, world, seed=0)
    model = build_gpt_model(cfg, dtype=dtype, use_cpu_initialization=device.type != "cuda").to(device)
    return model, MegatronRecipe(), ps.get_context_parallel_group()


def gather_max(values: dict, keys, device) -> dict:
    """The slowest / largest rank's value for each key (every rank reports its own)."""
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {**values, **{k: int(v) if k.endswith("bytes_per_step") else v for k, v in zip(keys, t.tolist())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="configs/model/llama3.2-1b.yaml")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape (memory, time)")
    ap.add_argument("--tokens-per-gpu", type=int, default=65536)
    ap.add_argument("--segment-size", type=int, default=4096)
    ap.add_argument("--fraction-all", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="cp1,cp1+offload,even,balanced,balanced+offload")
    ap.add_argument("--balance-cap", type=float, default=1.1, help="'capped' configs: at most this x the even share per rank")
    ap.add_argument("--megatron", action="store_true", help="the megatron-core model (TP = PP = 1) instead of the portable one")
    ap.add_argument("--out", default="runs/bench_cp")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]
    overrides = {
        "segment_size": args.segment_size,
        "history_policy": {"fraction": args.fraction_all},
        "attention_backend": "auto",
        "max_position_embeddings": max(8192, world * args.tokens_per_gpu),
    }
    if args.layers:
        overrides["num_layers"] = args.layers
    cfg = load_model_config(args.shape, overrides)
    torch.manual_seed(0)
    model, recipe, cp_group = build_model(cfg, args.megatron, device, world)
    S, rows = cfg.segment_size, []
    for name in args.configs.split(","):
        split, _, extra = name.partition("+")
        cp = 1 if split == "cp1" else world
        T = cp * args.tokens_per_gpu
        group = singles[rank] if cp == 1 else cp_group
        if split in ("balanced", "capped"):
            ranges = balanced_ranges(cfg, T, cp, token_cap=args.balance_cap if split == "capped" else None)
        elif split in ("cp1", "even"):
            ranges = context_parallel_ranges(T, S, cp)
        else:
            raise SystemExit(f"--configs: unknown split {split!r} in {name!r} (cp1, even, balanced, capped; +offload)")
        costs = model_segment_costs(cfg, T)
        clear_mask_cache()  # block masks of earlier configurations would count in this one's memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        counts = [(b - a + S - 1) // S for a, b in ranges]
        try:
            r = run_config(model, recipe, cfg, args, group, ranges, extra == "offload", device)
            status = "ok"
        except torch.OutOfMemoryError:
            r, status = dict(step_s=float("nan"), peak_gib=float("nan"), after_forward_gib=float("nan")), "OOM"
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        r = gather_max(r, [k for k in r if k != "loss"], device)
        row = dict(
            model=recipe.name,
            config=name,
            cp=cp,
            T=T,
            segments_per_rank=counts,
            flop_imbalance=imbalance(costs, counts),
            status=status,
            tokens_per_s_per_gpu=args.tokens_per_gpu / r["step_s"],
            model_tflops_per_gpu=model_flops(cfg, T) / cp / r["step_s"] / 1e12,
            **r,
        )
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["config"] == "cp1" and r["status"] == "ok"), None)
    for r in rows:
        if base is not None:
            r["weak_scaling_eff"] = base["step_s"] / r["step_s"]
            r["flop_scaling_eff"] = r["model_tflops_per_gpu"] / base["model_tflops_per_gpu"]
    if rank == 0:
        meta = dict(
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            gpus=world,
            model=recipe.name,
            torch=torch.__version__,
            shape=args.shape,
            layers=cfg.num_layers,
            tokens_per_gpu=args.tokens_per_gpu,
            segment_size=S,
            fraction_all=args.fraction_all,
            batch=1,
            dtype="bfloat16" if device.type == "cuda" else "float32",
            activation_checkpointing=False,
        )
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_cp.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"\n{meta}\n")
        print(
            "| config | CP | T | segments/rank | FLOP imbalance | step s | tokens/s/GPU | weak-scaling eff | FLOP-normalised eff "
            "| peak GiB | after fwd GiB | sent MiB/step | offloaded MiB/step | hidden MiB/step |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['config']} | {r['cp']} | {r['T']} | {r['segments_per_rank']} | {r['flop_imbalance']:.3f} | "
                f"{r['step_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | {r.get('weak_scaling_eff', float('nan')):.3f} | "
                f"{r.get('flop_scaling_eff', float('nan')):.3f} | {r['peak_gib']:.1f} | {r.get('after_forward_gib', 0):.1f} | "
                f"{r.get('bytes_sent_per_step', 0) / 2**20:.1f} | {r.get('offloaded_bytes_per_step', 0) / 2**20:.1f} | "
                f"{r.get('hidden_bytes_per_step', 0) / 2**20:.1f} |"
            )
        _plot(rows, args.out)
    dist.destroy_process_group()


def _plot(rows, out: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    ok = [r for r in rows if r["status"] == "ok"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.bar([r["config"] for r in ok], [r["step_s"] for r in ok])
    a.set_ylabel("step time (s)")
    b.bar([r["config"] for r in ok], [r["peak_gib"] for r in ok])
    b.set_ylabel("peak memory per GPU (GiB)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench_cp.png"), dpi=120)


if __name__ == "__main__":
    main()
