"""Training throughput: segtrain (segment attention) against the same model with full causal attention.

    python tools/bench_train.py --shape configs/model/llama3.2-1b.yaml --lengths 8192 32768 --out $OUT/bench_train

One GPU, batch 1, bf16 weights, fused AdamW, activation checkpointing on every layer for both
variants. The baseline is the same model with each layer's attention replaced by causal SDPA
(flash backend): full attention, gradient into every key. MFU counts model FLOPs only (recompute
excluded): 6 x (non-embedding parameters + LM head) per token, plus attention 3 x 4 x D per
(query head, visible key) pair: segtrain counts only the keys its policy makes visible.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from segtrain.config import load_model_config
from segtrain.models.llama import LlamaForCausalLM
from segtrain.policy import visible_pairs
from segtrain.train.activation_checkpoint import apply_activation_checkpointing

GiB = 2**30
H100_BF16_DENSE = 989e12


def causal_sdpa(q, k, v, **_):
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
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for T in args.lengths:
        for variant in ("full causal (SDPA flash)", "segtrain"):
            cfg = load_model_config(
                args.shape,
                {
                    "segment_size": args.segment_size,
                    "attention_backend": args.backend,
                    "history_policy": {"fraction": args.fraction_all},
                    "max_position_embeddings": max(T, 8192),
                },
            )
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = LlamaForCausalLM(cfg).to(torch.bfloat16)
            causal = variant != "segtrain"
            if causal:  # the same model, every layer's attention swapped for causal SDPA
                model.model.segment_attend = lambda layer: causal_sdpa
            apply_activation_checkpointing(model)
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
        base = rows[-2]["tokens_per_s"]
        rows[-2]["speedup"], rows[-1]["speedup"] = 1.0, rows[-1]["tokens_per_s"] / base
    meta = dict(
        device=torch.cuda.get_device_name(),
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
