"""Training throughput: segtrain (segment attention) against the same model with full causal attention.

    python tools/bench_train.py --shape configs/model/llama3.2-1b.yaml --lengths 8192 32768 --out $OUT/bench_train
    python tools/bench_train.py --lengths 32768 --megatron --no-causal                      # + megatron-core model, TP=1
    torchrun --nproc-per-node 2 tools/bench_train.py --lengths 32768 --megatron --no-causal  # megatron TP=2 (2 GPUs)

One GPU, batch 1, bf16 weights, fused AdamW, activation checkpointing on every layer for both
variants. The baseline is the same model with each layer's attention replaced by causal SDPA
(flash backend): full attention, gradient into every key. MFU counts model FLOPs only (recompute
excluded): 6 x (non-embedding parameters + LM head) per token, plus attention 3 x 4 x D per
(query head, visible key) pair: segtrain counts only the keys its policy makes visible.

``--megatron`` adds the megatron-core model (models/megatron.py: same operator, megatron's layers,
full recompute of every layer, chunked loss) with TP = the number of processes (torchrun). The
portable and causal variants run on rank 0 alone first, in the same run. tokens/s is per model
replica (a TP=2 model uses 2 GPUs); peak memory is rank 0's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from segtrain.attention import fill_slots
from segtrain.config import load_model_config
from segtrain.models.llama import LlamaForCausalLM
from segtrain.policy import visible_pairs
from segtrain.train.activation_checkpoint import apply_activation_checkpointing

GiB = 2**30
H100_BF16_DENSE = 989e12


class CausalSDPA(torch.nn.Module):
    """The baseline's attention slot: full causal attention by SDPA's flash kernel."""

    def forward(self, q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


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


def bench_config(args, T: int):
    """The model shape with the benchmark's segment execution, long enough for ``T`` tokens."""
    overrides = {
        "segment_size": args.segment_size,
        "attention_backend": args.backend,
        "history_policy": {"fraction": args.fraction_all},
        "max_position_embeddings": max(T, 8192),
    }
    return load_model_config(args.shape, overrides)


def bench(model, T: int, steps: int, warmup: int, vocab: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.randint(0, vocab, (1, T + 1), device="cuda", generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(x, labels=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    times.sort()
    return dict(step_s=times[len(times) // 2], peak_gib=torch.cuda.max_memory_allocated() / GiB, losses=losses)


def megatron_model(cfg, tp: int):
    from segtrain.models.megatron import build_gpt_model, init_model_parallel

    init_model_parallel(tp, 1, seed=0)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return build_gpt_model(cfg, tp=tp, dtype=torch.bfloat16, **recompute).cuda()


def megatron_bench(model, T: int, steps: int, warmup: int, vocab: int) -> dict:
    """:func:`bench` for the megatron model: positional inputs, per-token loss from megatron's vocab-parallel CE."""
    positions = torch.arange(T, device="cuda")[None]

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x, labels):
            return self.m(x, positions, None, labels=labels).float().mean()

    return bench(Loss(), T, steps, warmup, vocab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="configs/model/llama3.2-1b.yaml")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--segment-size", type=int, default=4096)
    ap.add_argument("--fraction-all", type=float, default=0.25)
    ap.add_argument("--backend", default="flex", help="segtrain attention backend (flex, flash)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_train")
    ap.add_argument("--megatron", action="store_true", help="also the megatron-core model, TP = number of processes")
    ap.add_argument("--no-causal", action="store_true", help="skip the full-causal baseline")
    ap.add_argument("--checkpoint-layers", type=int, nargs="*", default=[],
                    help="also segtrain recomputing only the first N layers (activation_checkpointing_layers)")  # fmt: skip
    args = ap.parse_args()
    tp, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.megatron or tp > 1:
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29555")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    partial = {f"segtrain, recompute {n} layers": n for n in args.checkpoint_layers}
    variants = ([] if args.no_causal else ["full causal (SDPA flash)"]) + ["segtrain", *partial]
    for T in args.lengths:
        for variant in variants if rank == 0 else []:
            cfg = bench_config(args, T)
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = LlamaForCausalLM(cfg).to(torch.bfloat16)
            causal = not variant.startswith("segtrain")
            if causal:  # the same model, every layer's attention slot filled with causal SDPA
                fill_slots(model, lambda slot: CausalSDPA())
            apply_activation_checkpointing(model, partial.get(variant))  # None: every layer
            r = bench(model, T, args.steps, args.warmup, cfg.vocab_size)
            flops = model_flops_per_step(model, T, causal)
            rows.append(
                dict(
                    T=T,
                    variant=variant,
                    S=None if causal else args.segment_size,
                    step_s=r["step_s"],
                    tokens_per_s=T / r["step_s"],
                    peak_gib=r["peak_gib"],
                    mfu=flops / r["step_s"] / H100_BF16_DENSE,
                    model_tflops=flops / r["step_s"] / 1e12,
                    first_loss=r["losses"][0],
                    last_loss=r["losses"][-1],
                )
            )
            print(json.dumps(rows[-1]), flush=True)
            del model
            torch.cuda.empty_cache()
        if args.megatron:
            if tp > 1:
                dist.barrier()  # the other ranks waited while rank 0 ran the single-GPU variants
            cfg = bench_config(args, T)
            torch.manual_seed(0)
            model = megatron_model(cfg, tp)
            r = megatron_bench(model, T, args.steps, args.warmup, cfg.vocab_size)
            with torch.device("meta"):
                flops = model_flops_per_step(LlamaForCausalLM(cfg), T, causal=False)
            row = dict(T=T, variant=f"segtrain megatron TP={tp}", S=args.segment_size, step_s=r["step_s"],
                       tokens_per_s=T / r["step_s"], peak_gib=r["peak_gib"], mfu=flops / r["step_s"] / H100_BF16_DENSE / tp,
                       model_tflops=flops / r["step_s"] / 1e12, first_loss=r["losses"][0], last_loss=r["losses"][-1])  # fmt: skip
            if rank == 0:
                rows.append(row)
                print(json.dumps(row), flush=True)
            del model
            torch.cuda.empty_cache()
        if rank != 0:
            continue
        at_T = [r for r in rows if r["T"] == T]
        base = at_T[0]["tokens_per_s"]
        for r in at_T:
            r["speedup"] = r["tokens_per_s"] / base
    if rank != 0:
        return
    meta = dict(
        device=torch.cuda.get_device_name(),
        processes=tp,
        torch=torch.__version__,
        shape=args.shape,
        backend=args.backend,
        fraction_all=args.fraction_all,
        batch=1,
        dtype="bfloat16",
        activation_checkpointing=True,
    )
    with open(os.path.join(args.out, "bench_train.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta}\n")
    print("| T | variant | S | step s | tokens/s | speedup | peak GiB | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['T']} | {r['variant']} | {r['S'] or '-'} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['speedup']:.2f}x | {r['peak_gib']:.1f} | {r['model_tflops']:.0f} | {r['mfu']:.1%} |"
        )


if __name__ == "__main__":
    main()
