"""Peak prefill memory and time: full attention (HF Llama + SDPA flash) against segtrain's segmented engine.

For each model shape (random bf16 weights, built once on the GPU and shared by every case) and each
length T, batch 1, logits of the last token only:

- ``hf_full``: ``transformers.LlamaForCausalLM`` (``attn_implementation="sdpa"``) in one call under
  ``sdpa_kernel(FLASH_ATTENTION)``, ``logits_to_keep=1``; it keeps its DynamicCache, as generation does.
- ``hf_chunked``: the same model fed ``--chunk`` tokens at a time into a ``DynamicCache`` (chunks after
  the first need a mask, so SDPA may pick the memory-efficient kernel).
- ``seg_all25``: segtrain engine prefill, segment size ``--segment-size``, 25% of KV heads ``all``, rest ``none``.
- ``seg_all0``: the same with every KV head ``none``.
- ``seg_all25_offload``: ``seg_all25`` with the ``all`` heads' history offloaded to pinned CPU memory.

Peak memory is ``torch.cuda.max_memory_allocated`` after a reset; "weights" is what is allocated
before the case starts, "beyond" is the peak minus that. Writes ``prefill.json`` and ``prefill.png``
(if matplotlib is installed) into ``--out``; the markdown table is printed last.

    python tools/bench_prefill.py   # default: segtrain's cases, Llama-3-8B shape, 128K (about a minute)
    python tools/bench_prefill.py --shapes llama3.2-1b,llama3-8b --lengths 32K,64K,128K --cases all --out runs/bench_prefill
    python tools/bench_prefill.py --smoke   # tiny shapes, CPU is fine
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from segtrain.checkpoint.hf import hf_config_dict
from segtrain.config import load_model_config
from segtrain.inference import SegmentedEngine
from segtrain.models.llama import LlamaForCausalLM
from segtrain.plotting import pyplot

CASES = ["hf_full", "hf_chunked", "seg_all25", "seg_all0", "seg_all25_offload"]
DEFAULT_CASES = ["seg_all25", "seg_all25_offload", "seg_all0"]  # about a minute on an H200
GIB = 2**30
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama3-8b", help="model flavors (configs/model/*.yaml), comma-separated")
    p.add_argument("--lengths", default="131072", help="prompt lengths, comma-separated; K suffix allowed (32K)")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"subset of {CASES}")
    p.add_argument("--segment-size", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=4096, help="chunk size of hf_chunked")
    p.add_argument("--prefill-chunk", type=int, default=None, help="segtrain engine: query tokens per prefill block (default: S)")
    p.add_argument("--out", default="runs/bench_prefill")
    p.add_argument("--no-warmup", action="store_true", help="skip the short warm-up run of each case")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes and lengths (runs on CPU); checks the script, not the numbers"
    )
    return p.parse_args(argv)


def _length(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


POLICIES = {"all25": {"fraction": 0.25}, "all0": "none"}


def build_models(config, device, dtype, policies=POLICIES):
    """One set of random weights: the HF model, and segtrain models (one per named policy) sharing its tensors."""
    import transformers

    hf_cfg = transformers.LlamaConfig(**hf_config_dict(config))
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa").eval()
    state = hf.state_dict()
    seg = {}
    for name, policy in policies.items():
        cfg = dataclasses.replace(config, history_policy=policy)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model.load_state_dict(state, assign=True)  # the same tensors: no extra weight memory
        seg[name] = model.eval()
    return hf, seg


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case, hf, seg, ids, args, device):
    """One prefill; returns timings, memory and cache sizes (GiB)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device) if cuda else None
    extra = {}
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if case == "hf_full":
            ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if cuda else nullcontext()
            with ctx:
                logits = hf(input_ids=ids, logits_to_keep=1).logits
        elif case == "hf_chunked":
            from transformers import DynamicCache

            kv = DynamicCache(config=hf.config)
            ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]) if cuda else nullcontext()
            with ctx:
                for a in range(0, ids.shape[1], args.chunk):
                    logits = hf(input_ids=ids[:, a : a + args.chunk], past_key_values=kv, use_cache=True, logits_to_keep=1).logits
        else:
            name = "all25" if case.startswith("seg_all25") else "all0"
            engine = SegmentedEngine(  # unfused: the models share the HF model's weights, which fusing would copy
                seg[name],
                offload_history=case.endswith("offload"),
                sdpa_prefill=True,
                prefill_chunk=args.prefill_chunk,
                fuse_projections=False,
            )
            cache = engine.new_cache(1, ids.shape[1])  # allocation (pinned host memory too) counts in time_s
            _sync(device)
            alloc_s = time.perf_counter() - t0
            logits = engine.prefill(cache, [ids[0]])
            extra = {
                "cache_alloc_s": alloc_s,
                "kv_cache_gib": cache.memory_bytes() / GIB,
                "offloaded_gib": cache.offloaded_bytes() / GIB,
                "prefill_chunk": engine.prefill_chunk,
            }
        _sync(device)
    seconds = time.perf_counter() - t0
    assert torch.isfinite(logits.float()).all(), f"{case}: non-finite logits"
    out = {"time_s": seconds, **extra}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        out.update(weights_gib=weights / GIB, peak_gib=peak / GIB, beyond_gib=(peak - weights) / GIB)
    del logits
    return out


def markdown(rows) -> str:
    head = "| shape | case | T | weights GiB | peak GiB | peak beyond weights GiB | KV cache GiB | offloaded GiB | time s |"
    lines = [head, "| " + " | ".join(["---"] * 9) + " |"]

    def f(x):
        return "-" if x is None else f"{x:.2f}"

    for r in rows:
        T = f"{r['T'] // 1024}K" if r["T"] % 1024 == 0 else str(r["T"])
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['case']} | {T} | {r['error']} | | | | | |")
            continue
        gib = [f(r.get(k)) for k in ("weights_gib", "peak_gib", "beyond_gib", "kv_cache_gib", "offloaded_gib")]
        lines.append(f"| {r['shape']} | {r['case']} | {T} | " + " | ".join(gib) + f" | {r['time_s']:.2f} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        print(f"(matplotlib is not installed: no plot at {path})")
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for case in dict.fromkeys(r["case"] for r in rows):
            pts = [
                (r["T"], r.get("beyond_gib"))
                for r in rows
                if r["shape"] == shape and r["case"] == case and r.get("beyond_gib") is not None
            ]
            if pts:
                ax.plot([t / 1024 for t, _ in pts], [y for _, y in pts], marker="o", label=case)
        ax.set(title=shape, xlabel="prompt length T (K tokens)", ylabel="peak memory beyond weights (GiB)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_prefill needs a CUDA GPU (or --smoke to check the script on CPU)")
    cases = CASES if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"--cases: unknown {sorted(unknown)}; choose from {CASES}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        shapes = {
            "smoke-mha": dict(SMOKE_SHAPE),
            "smoke-gqa": {**SMOKE_SHAPE, "num_heads": 8, "head_dim": 16, "tie_word_embeddings": True},
        }
        lengths, segment, chunk = [256, 512], 64, 96
    else:
        shapes = {name: {} for name in args.shapes.split(",") if name}
        lengths, segment, chunk = [_length(x) for x in args.lengths.split(",")], args.segment_size, args.chunk
    args.chunk = chunk
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape, fields in shapes.items():
        base = "tiny" if args.smoke else shape
        config = load_model_config(base, {**fields, "segment_size": segment, "max_position_embeddings": max(lengths)})
        torch.manual_seed(0)
        hf, seg = build_models(config, device, dtype)
        print(f"{shape}: {sum(p.numel() for p in hf.parameters()) / 1e9:.2f}B parameters, {dtype}, {device}", flush=True)
        for case in cases:
            if not args.no_warmup:  # kernels, allocator and pinned-memory paths once, short
                try:
                    run_case(
                        case, hf, seg, torch.randint(0, config.vocab_size, (1, 2 * segment + 1), device=device), args, device
                    )
                except Exception as e:  # report it and go on with the other cases
                    print(f"  warm-up {case}: {type(e).__name__}: {e}", flush=True)
            for T in lengths:
                ids = torch.randint(0, config.vocab_size, (1, T), device=device)
                row = {"shape": shape, "case": case, "T": T, "segment_size": segment}
                try:
                    row.update(run_case(case, hf, seg, ids, args, device))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                print("  " + json.dumps(row), flush=True)
                (out_dir / "prefill.json").write_text(
                    json.dumps({"device": _device_name(device), "dtype": str(dtype), "rows": rows}, indent=1)
                )
        del hf, seg
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if plot(rows, out_dir / "prefill.png"):
        print(f"plot: {out_dir / 'prefill.png'}")
    print(f"json: {out_dir / 'prefill.json'}\n")
    print(markdown(rows))
    return 0


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
