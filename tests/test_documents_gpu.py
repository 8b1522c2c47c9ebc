"""Document mode on the GPU: compiled flex (block lists with the documents in them), flash (flash-attn-4) and te
(one Transformer Engine call per document) against the float64 reference in document mode, forward and backward; the
model; and the benchmark script. Run on the lent GPU machine: ``pytest -m gpu tests/test_documents_gpu.py``."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_cases import make_qkv

from segtrain.attention import Documents, segment_attention
from segtrain.attention.backends import BACKENDS
from segtrain.config import ModelConfig
from segtrain.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]

CASES = [  # (Hq, Hkv, T, S, D, policies, tokens of each row's documents)
    (4, 2, 1024, 128, 64, ["all", "sink:4+window:100"], [[100, 30, 500, 394], [1024]]),
    (6, 3, 1100, 100, 32, ["none", "window:300", "all"], [[7, 1, 250, 842], [600, 500]]),  # S not a multiple of 128
    (8, 2, 2048, 256, 128, ["sink:130", "all"], [[1500, 548], [64] * 32]),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def documents(rows) -> Documents:
    return Documents.from_position_ids(torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows]).cuda())


def _available(backend: str) -> None:
    if not BACKENDS[backend].available(torch.device("cuda")):
        pytest.skip(f"{backend} needs {BACKENDS[backend].requirement}")


@pytest.mark.parametrize("backend, dtype", [("flex", torch.float32), ("flex", torch.bfloat16), ("flash", torch.bfloat16),
                                            ("te", torch.bfloat16)])  # fmt: skip
@pytest.mark.parametrize("case", CASES)
def test_backend_in_document_mode_matches_reference(case, backend, dtype):
    _available(backend)
    Hq, Hkv, T, S, D, policies, rows = case
    q, k, v = make_qkv(2, Hq, Hkv, T, D, device="cuda", seed=T)
    ref = segment_attention(q, k, v, segment_size=S, policy=policies, backend="reference", documents=documents(rows))
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = segment_attention(ql, kl, vl, segment_size=S, policy=policies, backend=backend, documents=documents(rows))
    grads = torch.autograd.grad(out, (ql, kl, vl), g.to(dtype))
    assert rel(out, ref) < TOL[dtype]
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel(a, b) < TOL[dtype], name


def test_flex_layouts_of_one_length_share_a_compiled_kernel():
    """Every step packs other documents: the compiled kernel must not recompile per layout (past the recompile limit
    FlexAttention silently runs dense, O(T^2) memory)."""
    from torch._dynamo.utils import counters

    q, k, v = make_qkv(1, 4, 2, 2048, 64, dtype=torch.bfloat16, device="cuda", seed=1)
    rng, graphs = random.Random(0), []
    for _ in range(6):
        cuts = sorted(rng.sample(range(1, 2048), 5))
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, 2048])]
        out = segment_attention(q, k, v, segment_size=256, policy="all", backend="flex", documents=documents([lengths]))
        out.float().sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * 5, graphs


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_model_in_document_mode_matches_math_float64(backend):
    _available(backend)
    config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                         segment_size=128, history_policy=[["all", "none"], ["sink:4+window:200", "all"]],
                         attention_backend="math", documents=True)  # fmt: skip
    torch.manual_seed(0)
    ref = LlamaForCausalLM(config).double().cuda()
    dtype = torch.bfloat16 if backend == "flash" else torch.float32  # flash-attn-4 takes 16-bit inputs only
    model = LlamaForCausalLM(ModelConfig(**{**config.to_dict(), "attention_backend": backend})).cuda()
    model.load_state_dict(ref.state_dict())
    model.to(dtype)
    positions = torch.cat([torch.arange(n) for n in (300, 17, 700, 7)])[None].cuda()
    ids = torch.randint(0, 256, (1, 1024), device="cuda")
    want = ref(ids, position_ids=positions)
    assert rel(model(ids, position_ids=positions), want) < (3e-2 if dtype == torch.bfloat16 else 1e-5)
    assert rel(ref(ids), want) > 0.1  # one stream differs: the check can fail


def test_bench_documents_runs_on_the_gpu(tmp_path):
    cmd = [sys.executable, "tools/bench_documents.py", "--layers", "2", "--length", "8192", "--mean", "1024",
           "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| flex | documents |" in done.stdout and (tmp_path / "bench_documents.json").is_file()
    rows = json.loads((tmp_path / "bench_documents.json").read_text())["rows"]
    for r in rows:  # the extra step's forward peak, then its backward peak: each within the timed steps' peak
        assert 0 < r["peak_forward_gib"] <= r["peak_gib"] * 1.01 and 0 < r["peak_backward_gib"] <= r["peak_gib"] * 1.01, r
