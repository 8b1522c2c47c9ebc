"""The adaptation recipe end to end on a CPU, from a Hugging Face Llama directory: ``segtrain convert --from hf`` ->
``segtrain calibrate`` -> ``segtrain train --init-from`` (configs/train/adapt-tiny.yaml, the calibrated dir as
````model``) -> ``segtrain eval --mode full,segmented`` -> ``segtrain convert --to hf``; and the study's report."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def segtrain(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "segtrain", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, f"segtrain {args[0]}: " + run.stdout[-2000:] + run.stderr[-3000:]
    return run


def hf_llama(out: Path, tokenizer_file: str) -> Path:
    """A full-attention Llama as transformers writes it (random weights, the tiny tokenizer beside them)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1e4,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    shutil.copyfile(tokenizer_file, out / "tokenizer.model")
    return out


def norm_distance(a: dict, b: dict) -> float:
    return (sum((a[k].double() - b[k].double()).norm() ** 2 for k in a) / sum(b[k].double().norm() ** 2 for k in b)) ** 0.5


@pytest.mark.slow
def test_hf_llama_to_segmented_model_and_back(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file

    from segtrain.checkpoint import load_config, load_pretrained

    hf = hf_llama(tmp_path / "hf", tiny_tokenizer.model_file)
    model, cal, run, hf_out = (tmp_path / n for n in ("model", "calibrated", "train", "hf_out"))
    segtrain("convert", "--from", "hf", hf, model, "--segment-size", 64, "--no-progress", cwd=tmp_path)
    assert {str(p) for row in load_config(model).policy_table().layers for p in row} == {"all"}  # full attention

    segtrain("preprocess", "corpus", "--out", tmp_path / "text.jsonl", "--max-bytes", 60_000, cwd=tmp_path)
    segtrain("preprocess", "data", "--input", tmp_path / "text.jsonl", "--tokenizer", model, "--out", tmp_path / "corpus",
             "--workers", 1, "--no-progress", cwd=tmp_path)  # fmt: skip  # the model's own tokenizer

    segtrain("calibrate", "--model", model, "--out", cal, "--budget", 0.25, "--bounded", "none", "--seq-length", 256,
             "--tasks", "passkey", "--steps", 2, "--batch-size", 2, "--workers", 1, "--no-progress", cwd=tmp_path)  # fmt: skip
    calibration = json.loads((cal / "calibration.json").read_text())
    assert len(calibration["all_heads"]) == 2  # 25% of 2 layers x 4 KV heads
    cal_policy = load_config(cal).policy_table().to_spec()

    segtrain("train", "--config", ROOT / "configs/train/adapt-tiny.yaml", "--set", f"model={cal}",
             "--set", f"data.prefixes=[{tmp_path / 'corpus'}]", "--set", f"data.tokenizer={cal}", "--set", f"out_dir={run}",
             "--set", "steps=4", "--init-from", cal, "--no-progress", cwd=tmp_path)  # fmt: skip
    final = run / "final"
    assert load_config(final).policy_table().to_spec() == cal_policy  # trained with the calibrated heads, S=64
    assert load_config(final).segment_size == 64
    start, trained = load_file(hf / "model.safetensors"), load_file(final / "model.safetensors")
    assert norm_distance(trained, start) < 0.05  # fine-tuned from the HF weights (a fresh init is ~1.4 away) ...
    assert norm_distance(trained, start) > 1e-6  # ... and trained

    segtrain("eval", "--model", final, "--mode", "full,segmented", "--length", "256,512", "--tasks", "passkey",
             "--samples", 3, "--batch-size", 3, "--no-prefill", "--out", tmp_path / "eval", "--no-progress",
             cwd=tmp_path)  # fmt: skip
    records = json.loads((tmp_path / "eval/results.json").read_text())["records"]
    measured = {(r["mode"].split()[0], r["length"]) for r in records}
    assert measured == {(m, n) for m in ("full", "segmented") for n in (256, 512)}, measured
    assert all(set(r["retrieval"]["passkey"]) >= {"own", "previous", "history"} for r in records if r["length"] == 512)

    segtrain("convert", "--to", "hf", final, hf_out, "--no-progress", cwd=tmp_path)
    import transformers

    exported = transformers.AutoModelForCausalLM.from_pretrained(hf_out, trust_remote_code=True).eval()
    ours = load_pretrained(final)
    ids = torch.randint(0, 400, (2, 200), generator=torch.Generator().manual_seed(1))  # 4 segments: history heads matter
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
