"""The lm-evaluation-harness backend: ``segtrain-lm-eval --model segtrain`` runs local tasks of every request type
(loglikelihood, loglikelihood_rolling, generate_until) offline, and its scores are the model's own log-probabilities
under the requested execution mode."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_model, tiny_config

lm_eval = pytest.importorskip("lm_eval")

from segtrain.checkpoint import save_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("lm_eval")
    config = tiny_config(vocab_size=400, hidden_size=32, intermediate_size=64, num_heads=4, segment_size=8, history_policy="none",
                         attention_backend="math", max_position_embeddings=256, initializer_range=0.2)  # fmt: skip
    save_pretrained(make_model(config, seed=0), config, root / "model")
    (root / "model" / "tokenizer.model").write_bytes(Path(tiny_tokenizer.model_file).read_bytes())
    return root / "model"


def test_local_tasks_run_through_the_wrapper_command(tmp_path, model_dir):
    """Each reported metric is recomputed from the logged requests, scored in this process by the same model in the same
    mode: the command's numbers are this model's, under segmented execution at segment size 16."""
    from lm_eval.api.instance import Instance

    from segtrain.eval.harness import SegtrainLM

    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": os.fspath(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "segtrain.eval.harness", "--model", "segtrain", "--model_args",
           f"pretrained={model_dir},mode=segmented,segment_size=16", "--tasks", "segtrain_mc,segtrain_ppl,segtrain_gen",
           "--include_path", "tests/data/lm_eval", "--output_path", os.fspath(tmp_path / "out"), "--batch_size", "2",
           "--log_samples"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (found,) = list((tmp_path / "out").rglob("results_*.json"))
    report = json.loads(found.read_text())
    assert report["config"]["model"] == "segtrain"
    results = report["results"]

    def samples(task):
        (path,) = list((tmp_path / "out").rglob(f"samples_{task}_*.jsonl"))
        return [json.loads(line) for line in path.read_text().splitlines()]

    lm = SegtrainLM(pretrained=str(model_dir), mode="segmented", segment_size=16, batch_size=2)
    correct = []
    for doc in samples("segtrain_mc"):
        pairs = [tuple(a.values()) for a in doc["arguments"].values()]
        scores = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
        assert [float(r[0][0]) for r in doc["resps"]] == pytest.approx(scores, rel=1e-5, abs=1e-5)
        correct.append(max(range(len(scores)), key=scores.__getitem__) == int(doc["target"]))
    assert results["segtrain_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    total = words = n_bytes = 0.0
    for doc in samples("segtrain_ppl"):
        text = doc["doc"]["text"]
        (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        assert float(doc["resps"][0][0]) == pytest.approx(ll, rel=1e-5)
        total, words, n_bytes = total + ll, words + len(text.split()), n_bytes + len(text.encode("utf-8"))
    assert results["segtrain_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert results["segtrain_ppl"]["byte_perplexity,none"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-4)

    matches = []
    for doc in samples("segtrain_gen"):
        args = tuple(doc["arguments"]["gen_args_0"].values())
        (text,) = lm.generate_until([Instance("generate_until", {}, args, 0)])
        assert doc["resps"][0][0] == text
        matches.append(text.strip() == doc["target"].strip())
    assert results["segtrain_gen"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))


def test_scores_are_the_models_log_probabilities_in_each_mode(model_dir):
    from lm_eval.api.instance import Instance

    from segtrain.eval.harness import SegtrainLM

    long_context = " ".join(["the sky is blue and the grass is green"] * 6)
    requests = [Instance("loglikelihood", {}, (long_context, " and the sun"), 0),
                Instance("loglikelihood", {}, ("Two plus two is", " four"), 1)]  # fmt: skip
    scores = {}
    for mode in ("full", "segmented"):
        lm = SegtrainLM(pretrained=str(model_dir), mode=mode, batch_size=2)
        got = lm.loglikelihood(requests, disable_tqdm=True)
        ctx, cont = lm._encode_pair(*requests[0].args)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(lm.model(ids[:, :-1]).float(), -1)[0, len(ctx) - 1 :]
        want = logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert got[0][0] == pytest.approx(want, rel=1e-5, abs=1e-5)
        scores[mode] = got[0][0]
        assert lm.mode.kind == mode and (lm.model.config.segment_size == 256) == (mode == "full")
    assert abs(scores["full"] - scores["segmented"]) > 1e-4  # the long context is past one segment: the modes differ
