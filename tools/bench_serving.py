"""Serving a segtrain model, in one run: transformers ``generate()`` on the segment-attention export, segtrain's engine,
and plain Hugging Face Llama with full attention. Per case and prompt length, batch 1: prefill time and peak memory,
decoding ms/token and peak memory, and the KV cache each holds.

Random weights (bf16 on CUDA) are built on the device once and shared by the three models:

- ``export``: the model of ``segtrain convert --to hf`` (``modeling_segtrain.py``, loaded through its ``auto_map`` with
  ``trust_remote_code=True`` from a directory holding the export's config and modeling file; the weights are assigned,
  not written and read: 16 GB of random numbers are no test of safetensors), run by ``generate()``: block-wise prefill,
  then its ``SegmentCache``.
- ``segtrain``: ``SegmentedEngine`` with its CUDA defaults (SDPA prefill, the decoding step compiled and captured as a
  CUDA graph, the Triton decode kernel). Its prefill is measured by a prefill-only call, its decoding by ``generate``.
- ``hf_full``: ``transformers.LlamaForCausalLM`` with SDPA and its ``DynamicCache``: full attention, what a plain-Llama
  export (``--plain-llama``) runs.

``generate()`` cases are timed by a stopping criterion that synchronises and stamps every step: prefill is the time to
the first token, decoding the mean of the steps after it; the prefill peak is read at the first token, then the peak
is reset for decoding. "beyond" subtracts the weights. A case that cannot run (out of memory, anything else) is
recorded with a one-line reason and the others go on. ``serving.json`` and ``serving.png`` go to ``--out``, rewritten
after every case; the table is printed last.

    python tools/bench_serving.py                        # Llama-3-8B shape, 32K and 128K (a few minutes on an H100)
    python tools/bench_serving.py --out docs/bench/serving_h100_8b
    python tools/bench_serving.py --tiny                 # tiny shape on CPU in seconds: checks the script, not the numbers
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from segtrain.checkpoint import hf
from segtrain.config import load_model_config
from segtrain.inference import SegmentedEngine
from segtrain.models.llama import LlamaForCausalLM
from segtrain.plotting import pyplot

CASES = ("export", "segtrain", "hf_full")
GIB = 2**30
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", help="model flavor (configs/model/*.yaml)")
    p.add_argument("--lengths", default="32K,128K", help="prompt lengths, comma-separated; K suffix allowed")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per case (decoding is timed after the first)")
    p.add_argument("--segment-size", type=int, default=4096)
    p.add_argument("--policy", default="{fraction: 0.25}", help="history policy (YAML); default: 25%% of KV heads 'all'")
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    p.add_argument("--out", default="runs/bench_serving")
    p.add_argument("--tiny", action="store_true", help="a tiny shape and short prompts (CPU is fine): checks the script")
    return p.parse_args(argv)


def _length(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _peak(device: torch.device, reset: bool = False) -> int | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---- the three models, one set of weights --------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    config: object  # segtrain ModelConfig
    segtrain: LlamaForCausalLM
    hf_full: torch.nn.Module
    export: torch.nn.Module
    weight_bytes: int


def build_models(config, device: torch.device, dtype: torch.dtype, workdir: Path) -> Models:
    """Random weights on ``device`` (transformers' Llama initialises them), then the segtrain model and the export
    assigned the same tensors: one copy of the weights for all three."""
    import transformers

    with torch.device(device):
        hf_full = transformers.LlamaForCausalLM._from_config(
            transformers.LlamaConfig(**hf.hf_config_dict(config)), dtype=dtype, attn_implementation="sdpa"
        ).eval()
    state = hf_full.state_dict()
    with torch.device("meta"):
        seg = LlamaForCausalLM(config)
    seg.load_state_dict(state, assign=True)
    export_dir = workdir / "export"  # what `segtrain convert --to hf` writes, but the weights
    export_dir.mkdir(parents=True, exist_ok=True)
    (export_dir / "config.json").write_text(json.dumps(hf.config_to_hf(config, dtype), indent=2))
    shutil.copyfile(Path(hf.__file__).with_name("hf_modeling.py"), export_dir / hf.MODELING_FILE)
    export_config = transformers.AutoConfig.from_pretrained(export_dir, trust_remote_code=True)
    with torch.device("meta"):
        export = transformers.AutoModelForCausalLM.from_config(export_config, trust_remote_code=True)
    missing, unexpected = export.load_state_dict(state, assign=True, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]:
        raise RuntimeError(f"export weights: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        export.lm_head.weight = export.model.embed_tokens.weight
    with torch.device(device):  # RoPE frequencies are buffers outside the state dict: made again, on the device
        export.model.rotary_emb = type(export.model.rotary_emb)(config=export.config)
    return Models(config, seg.eval(), hf_full, export.eval(), sum(t.nbytes for t in state.values()))


# ---- one case -------------------------------------------------------------------------------------------------------


def _steps(device: torch.device):
    """A stopping criterion that never stops: it synchronises and stamps each generated token, reads the prefill peak
    at the first and resets the peak for decoding."""
    import transformers

    class Steps(transformers.StoppingCriteria):
        def __init__(self):
            self.times, self.prefill_peak = [], None

        def __call__(self, input_ids, scores, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter())
            if len(self.times) == 1:
                self.prefill_peak = _peak(device, reset=True)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Steps()


def _cache_bytes(cache) -> int:
    if hasattr(cache, "memory_bytes"):  # the export's SegmentCache
        return cache.memory_bytes()
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def _transformers_case(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    import transformers

    steps = _steps(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(  # one row, no padding: an all-ones mask (else generate reads pad_token_id in ids as padding)
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            stopping_criteria=transformers.StoppingCriteriaList([steps]),
            return_dict_in_generate=True,
        )
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers 5.25 and 5.17
    decode = (steps.times[-1] - steps.times[0]) / (len(steps.times) - 1) if len(steps.times) > 1 else None
    return {
        "prefill_s": steps.times[0] - t0,
        "prefill_peak": steps.prefill_peak,
        "decode_ms": None if decode is None else 1e3 * decode,
        "decode_peak": _peak(device),
        "kv_cache_gib": _cache_bytes(cache) / GIB,
        "cache": type(cache).__name__,
        "tokens": out.sequences[0, ids.shape[1] :].tolist(),
    }


def _segtrain_case(model, ids: torch.Tensor, new_tokens: int, device: torch.device, engines: dict) -> dict:
    # compiled decoder layers are reused across lengths; unfused: the three models share one set of weights, which
    # fusing would copy (fused decoding's speed: bench_decode)
    engine = engines.setdefault("engine", SegmentedEngine(model, fuse_projections=False))
    prompt = ids[0].tolist()
    with torch.inference_mode():
        cache = engine.new_cache(1, len(prompt) + new_tokens)
        _peak(device, reset=True)
        _sync(device)
        t0 = time.perf_counter()
        engine.prefill(cache, [prompt])
        _sync(device)
        prefill_s, prefill_peak = time.perf_counter() - t0, _peak(device, reset=True)
        del cache
        result = engine.generate([prompt], max_new_tokens=new_tokens)
    return {
        "prefill_s": prefill_s,
        "prefill_peak": prefill_peak,
        "decode_ms": 1e3 * result.decode_s / result.decode_steps if result.decode_steps else None,
        "decode_peak": _peak(device),
        "kv_cache_gib": result.cache_bytes / GIB,
        "cache": "SegmentKVCache (static)",
        "setup_s": result.setup_s,
        "tokens": result.tokens[0],
    }


def run_case(name: str, models: Models, ids: torch.Tensor, new_tokens: int, device: torch.device, engines: dict) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if name == "segtrain":
        return _segtrain_case(models.segtrain, ids, new_tokens, device, engines)
    return _transformers_case(getattr(models, name), ids, new_tokens, device)


def reason(error: BaseException) -> str:
    """One line: why a case could not run."""
    first = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        return f"out of memory: {first}"[:200]
    return f"{type(error).__name__}: {first}"[:200]


# ---- report ---------------------------------------------------------------------------------------------------------


def _gib(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"GPU: {device}",
        "| case | T | prefill s | prefill peak beyond weights GiB | decode ms/token | decode peak beyond weights GiB "
        "| KV cache GiB | leading tokens equal to segtrain's |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {_k(r['T'])} | {r['error']} | | | | | |")
            continue
        agree = r.get("tokens_agree_segtrain")
        same = "-" if agree is None else f"{agree} of {len(r['tokens'])}"
        decode = "-" if r["decode_ms"] is None else f"{r['decode_ms']:.2f}"
        lines.append(
            f"| {r['case']} | {_k(r['T'])} | {r['prefill_s']:.2f} | {_gib(r.get('prefill_beyond_gib'))} | {decode} | "
            f"{_gib(r.get('decode_beyond_gib'))} | {r['kv_cache_gib']:.2f} | {same} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, device: str) -> bool:
    plt = pyplot()
    if plt is None:
        print(f"(matplotlib is not installed: no plot at {path})")
        return False
    panels = [
        ("prefill_beyond_gib", "prefill peak beyond weights (GiB)"),
        ("decode_ms", "decoding ms/token"),
        ("kv_cache_gib", "KV cache (GiB)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    for ax, (key, label) in zip(axes, panels):
        for case in dict.fromkeys(r["case"] for r in rows):
            pts = [(r["T"] / 1024, r[key]) for r in rows if r["case"] == case and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=case)
        ax.set(xlabel="prompt length (K tokens)", ylabel=label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(f"serving, batch 1, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- main -----------------------------------------------------------------------------------------------------------


def main(argv=None, runner=run_case) -> int:
    """``runner(name, models, ids, new_tokens, device, engines) -> dict`` runs one case (tests pass one that fails)."""
    args, started = parse_args(argv), time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")  # --tiny checks the script
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("bench_serving needs a CUDA GPU (or --tiny to check the script on CPU)")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(cases) - set(CASES) or not cases:
        raise SystemExit(f"--cases: expected a subset of {','.join(CASES)}, got {args.cases!r}")
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens: at least 2 (decoding is timed from the second token on)")
    policy = yaml.safe_load(args.policy)
    if args.tiny:
        shape, fields, lengths, segment = "tiny", dict(TINY), [96, 200], 16
    else:
        shape, fields, lengths, segment = args.shape, {}, [_length(x) for x in args.lengths.split(",")], args.segment_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = load_model_config(
        shape,
        {**fields, "segment_size": segment, "history_policy": policy, "max_position_embeddings": max(lengths) + args.new_tokens},
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = device_name(device)
    meta = {
        "device": gpu,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "shape": shape,
        "dtype": str(dtype),
        "segment_size": segment,
        "policy": config.policy_table().to_spec()[0],
        "new_tokens": args.new_tokens,
        "batch": 1,
    }
    print(json.dumps(meta), flush=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        models = build_models(config, device, dtype, Path(work))
        meta["weights_gib"] = models.weight_bytes / GIB
        print(f"{shape}: {models.weight_bytes / GIB:.2f} GiB of weights, built in {time.perf_counter() - t0:.1f}s", flush=True)
        engines: dict = {}
        warm = torch.randint(1, config.vocab_size, (1, 2 * segment + 3), device=device)
        for name in cases:  # kernels, allocator, the engine's compiled step: once, short
            try:
                runner(name, models, warm, args.new_tokens, device, engines)
            except Exception as e:
                print(f"  warm-up {name}: {reason(e)}", flush=True)
        rows = []
        for T in lengths:
            ids = torch.randint(1, config.vocab_size, (1, T), device=device)
            for name in cases:
                row = {"case": name, "T": T}
                weights = _allocated(device)
                t0 = time.perf_counter()
                try:
                    result = runner(name, models, ids, args.new_tokens, device, engines)
                except Exception as e:  # out of memory or anything else: one line, and the other cases go on
                    row["error"] = reason(e)
                    result = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if result is not None:
                    for phase in ("prefill", "decode"):
                        peak = result.pop(f"{phase}_peak", None)
                        if peak is not None:
                            row[f"{phase}_peak_gib"], row[f"{phase}_beyond_gib"] = peak / GIB, (peak - weights) / GIB
                    row.update(result)
                row["case_s"] = time.perf_counter() - t0
                rows.append(row)
                print("  " + json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
                _write(out_dir, meta, rows)
    reference = {r["T"]: r.get("tokens") for r in rows if r["case"] == "segtrain"}
    for r in rows:
        if r.get("tokens") is not None and reference.get(r["T"]) is not None and r["case"] != "segtrain":
            # how many generated tokens agree before the first difference (random bf16 weights give near-flat logits,
            # so rounding can flip an argmax early; float32 on CPU agrees throughout: tests/test_bench_serving.py)
            ref = reference[r["T"]]
            differ = [i for i, (a, b) in enumerate(zip(r["tokens"], ref)) if a != b]
            r["tokens_agree_segtrain"] = differ[0] if differ else min(len(r["tokens"]), len(ref))
    _write(out_dir, meta, rows)
    if plot(rows, out_dir / "serving.png", gpu):
        print(f"plot: {out_dir / 'serving.png'}")
    print(f"json: {out_dir / 'serving.json'} ({time.perf_counter() - started:.0f}s in all)\n")
    print(markdown(rows, gpu))
    return 0


def _write(out_dir: Path, meta: dict, rows: list[dict]) -> None:
    """serving.json, replaced whole (temp file, then rename): a killed run leaves the rows done so far."""
    tmp = out_dir / "serving.json.tmp"
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    tmp.replace(out_dir / "serving.json")


if __name__ == "__main__":
    sys.exit(main())
