"""``segtrain eval``: full mode equals a plain transformers forward, the fast scoring path equals real greedy
generation, needles land in the distance bucket they aim at, perplexity sums are the model's loss, and bad
input fails with one line (exit 2)."""

import json
import os
import re

import numpy as np
import pytest
import torch
from tiny_models import make_model, tiny_config

from segtrain.checkpoint import save_pretrained
from segtrain.eval.evaluate import EvalPlan, evaluate
from segtrain.eval.modes import ExecutionMode, executed_as, parse_modes
from segtrain.eval.perplexity import heldout_sequences, position_nll
from segtrain.eval.retrieval import BUCKETS, bucket_of, retrieval_set, score_generated, score_teacher_forced
from segtrain.models.llama import LlamaForCausalLM

transformers = pytest.importorskip("transformers")

MIXED = [["all", "none"], ["sink:4+window:16", "none"]]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    """conftest's tiny tokenizer (400 pieces)."""
    return tiny_tokenizer


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, tokenizer):
    from segtrain.data.corpus import corpus_documents

    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for record in list(corpus_documents(max_bytes=300_000))[-40:]:
            f.write(json.dumps(record) + "\n")
    return path


def tiny_model(seed=0, dtype=torch.float32, **fields) -> LlamaForCausalLM:
    base = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_heads=4, segment_size=32, history_policy=MIXED,
                attention_backend="math", max_position_embeddings=1024, initializer_range=0.2)  # fmt: skip
    return make_model(tiny_config(**{**base, **fields}), seed, dtype)


def test_full_mode_equals_transformers_on_a_converted_hf_dir(tmp_path, tokenizer, heldout):
    from segtrain.convert import to_hf
    from segtrain.eval.load import load_model

    model = tiny_model(1, tie_word_embeddings=False)
    save_pretrained(model, model.config, tmp_path / "src")
    to_hf(tmp_path / "src", tmp_path / "hf", progress=False)
    ours, _ = load_model(tmp_path / "hf", device=torch.device("cpu"))
    assert ours.config.segment_size == 32 and ours.config.history_policy != "all"  # the policy travelled in the segtrain key
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    seqs = heldout_sequences(heldout, tokenizer, 200, 3)
    full = executed_as(ours, ExecutionMode("full"), 200)
    with torch.no_grad():
        expected = ref(seqs[:, :-1]).logits
        torch.testing.assert_close(full(seqs[:, :-1]), expected, rtol=1e-5, atol=2e-5)
        ce = torch.nn.functional.cross_entropy(expected.transpose(1, 2).double(), seqs[:, 1:], reduction="none")
        segmented = ours(seqs[:, :-1])
    assert (segmented - expected).abs().max() > 1e-3  # the model's own (segmented) mode really differs at T > 2S
    sums, counts = position_nll(full, seqs, 32, batch_size=2)
    per_position = ce.sum(0)
    want = np.array([per_position[i * 32 : (i + 1) * 32].sum().item() for i in range(7)])
    np.testing.assert_allclose(sums, want, rtol=1e-5)
    assert counts.tolist() == [32 * 3] * 6 + [8 * 3]

    # the CLI on the same HF dir, full mode, perplexity only: the same mean loss as transformers
    from segtrain.cli import main

    out = tmp_path / "out"
    args = ["eval", "--model", str(tmp_path / "hf"), "--mode", "full", "--tasks", "", "--length", "200", "--ppl-data",
            str(heldout), "--ppl-sequences", "3", "--tokenizer", tokenizer.model_file, "--out", str(out)]  # fmt: skip
    args.append("--no-progress")
    assert main(args) == 0
    record = json.loads((out / "results.json").read_text())["records"][0]
    assert record["mode"] == "full" and record["segment_size"] == 200 and record["policy"] == "all"
    assert record["ppl"]["nll"] == pytest.approx(ce.mean().item(), rel=1e-5)
    assert (out / "ppl.png").stat().st_size > 0


def test_segmented_override_equals_a_model_built_with_that_execution():
    model = tiny_model(2)
    mode = parse_modes("segmented", segment_size=16, policy="none")[0]
    twin = executed_as(model, mode, 100)
    assert twin.config.segment_size == 16 and twin.config.history_policy == "none"
    assert twin.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # shared, not copied
    rebuilt = tiny_model(2, segment_size=16, history_policy="none")
    ids = torch.randint(0, 400, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids), rebuilt(ids))
    assert executed_as(model, ExecutionMode("segmented"), 100) is model


@pytest.mark.parametrize("task", ["passkey", "needle", "recall"])
def test_needles_land_in_the_bucket_they_aim_at(tokenizer, task):
    items = retrieval_set(task, tokenizer, 1536, 6, segment_size=256, seed=3)
    assert [it.target for it in items] == list(BUCKETS) * 2
    for it in items:
        assert len(it.sample.input_ids) == 1536
        for a in it.answers:
            assert a.bucket == it.target, (task, it.index, a)
            assert bucket_of(a.start - 1, a.needle_start, 256) == a.bucket
    again = retrieval_set(task, tokenizer, 1536, 6, segment_size=256, seed=3)
    assert [it.sample.input_ids for it in again] == [it.sample.input_ids for it in items]  # a pure function of the seed


def test_bucket_of():
    assert [bucket_of(q, n, 10) for q, n in ((25, 20), (25, 19), (25, 10), (25, 9), (25, 0))] == [
        "own", "previous", "previous", "history", "history",
    ]  # fmt: skip


def test_teacher_forced_scoring_equals_greedy_generation(tokenizer):
    """Half of the samples get the model's own greedy continuation as their answer (so both scorers must say
    right), the other half keep the true pass key (a random model gets it wrong): both scorers agree on each."""
    from segtrain.inference import SegmentedEngine

    model = tiny_model(5, dtype=torch.float64, segment_size=64)
    recall = {"num_pairs": 4, "num_queries": 2}
    items = retrieval_set("passkey", tokenizer, 256, 4, segment_size=64)
    items += retrieval_set("recall", tokenizer, 256, 2, segment_size=64, options=recall)
    mine = [(item, item.answers[0]) for k, item in enumerate(items) if k % 2 == 0]
    greedy = SegmentedEngine(model).generate([it.sample.input_ids[: a.start] for it, a in mine], max_new_tokens=6).tokens
    for (item, a), tokens in zip(mine, greedy):
        item.sample.input_ids[a.start : a.end] = tokens[: a.end - a.start]
    score_teacher_forced(model, items, batch_size=4)
    fast = [[a.correct for a in it.answers] for it in items]
    score_generated(model, items, batch_size=4)
    slow = [[a.correct for a in it.answers] for it in items]
    assert fast == slow
    assert [f[0] for f in fast] == [k % 2 == 0 for k in range(len(items))]


def test_evaluate_records_and_markdown(tokenizer, heldout):
    from segtrain.eval.report import markdown

    model = tiny_model(6, segment_size=64)
    plan = EvalPlan(modes=parse_modes("full,segmented"), lengths=[512], tasks=["passkey", "needle"], samples=3, batch_size=3,
                    ppl_data=str(heldout), ppl_sequences=2)  # fmt: skip
    records = evaluate(model, tokenizer, plan, progress=False)
    assert [(r["mode"], r["segment_size"]) for r in records] == [("full", 512), ("segmented", 64)]
    for r in records:
        assert set(r["retrieval"]) == {"passkey", "needle"}
        assert sum(c["total"] for c in r["retrieval"]["passkey"].values()) == 3
        assert len(r["ppl"]["segments"]) == 8 and r["prefill"]["time_s"] > 0
    text = markdown(records)
    assert "| segmented | 512 | needle |" in text and "seg 4-7" in text and "50% none" in text
    late = evaluate(model, tokenizer, plan, progress=False, deadline=0.0)  # out of time: records say so
    assert all(r.get("skipped") for r in late)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "passkey,sudoku"], "--tasks: unknown task 'sudoku'"),
        (["--policy", "sink:x"], "history_policy"),
        (["--mode", "streaming"], "--mode: 'streaming' is not a mode"),
        (["--length", "4Q"], "--length: '4Q'"),
        (["--task-options", "{digits: 2}"], "--task-options: not JSON"),
        (["--task-options", '{"needle": {"digits": 2}}', "--tasks", "passkey"], "--task-options: 'needle' must be one of"),
        (["--task-options", '{"passkey": {"digitz": 2}}'], "--task-options: passkey.digitz: not an option here"),
        (["--task-options", '{"passkey": {"depth": 0.5}}'], "--task-options: passkey.depth: not an option here"),
    ],
)
def test_bad_input_fails_with_one_line(tmp_path, tokenizer, capsys, extra, message):
    from segtrain.cli import main

    model = tiny_model(0)
    save_pretrained(model, model.config, tmp_path / "m")
    rc = main(["eval", "--model", str(tmp_path / "m"), "--tokenizer", tokenizer.model_file, "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


def test_model_dir_without_weights_and_extrapolation_warning(tmp_path, tokenizer, capsys):
    from segtrain.cli import main

    model = tiny_model(0, max_position_embeddings=128)
    save_pretrained(model, model.config, tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    assert main(["eval", "--model", str(tmp_path / "m"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and str(tmp_path / "m") in err

    save_pretrained(model, model.config, tmp_path / "m")
    args = ["eval", "--model", str(tmp_path / "m"), "--tokenizer", tokenizer.model_file, "--length", "256", "--samples", "3",
            "--tasks", "passkey", "--task-options", '{"passkey": {"digits": 2}}', "--no-progress", "--no-prefill"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "beyond the model's max_position_embeddings=128" in captured.err
    assert "| segmented | 256 | passkey |" in captured.out


def test_help_shows_the_defaults(capsys):
    from segtrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 16384)", "(default: segmented)", "(default: passkey,needle,recall)", "(default: 48)",
                    "(default: 8)", "(default: auto)"):  # fmt: skip
        assert default in text, default
    assert "(default: False)" not in text and "(default: None)" not in text


def test_a_too_short_length_fails_before_the_model_loads_naming_length_and_the_minimum(tmp_path, tokenizer, capsys,
                                                                                       monkeypatch):  # fmt: skip
    from segtrain.cli import main
    from segtrain.data.synthetic import SyntheticError
    from segtrain.eval import load

    model = tiny_model(0)
    save_pretrained(model, model.config, tmp_path / "m")
    monkeypatch.setattr(load, "build_model", lambda *a, **k: pytest.fail("the model loaded before --length was checked"))
    rc = main(["eval", "--model", str(tmp_path / "m"), "--tokenizer", tokenizer.model_file, "--length", "64,4K",
               "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    match = re.fullmatch(r"segtrain eval: error: --length: 64 tokens are too few for the (\w+) task, whose samples need "
                         r"at least (\d+) with this tokenizer; pass --length \2 or more", err)  # fmt: skip
    assert match, err
    task, need = match[1], int(match[2])
    retrieval_set(task, tokenizer, need, 48, segment_size=32)  # the minimum is exact: every sample fits at it ...
    with pytest.raises(SyntheticError, match="seq_length"):
        retrieval_set(task, tokenizer, need - 1, 48, segment_size=32)  # ... and one does not fit a token shorter
    EvalPlan(modes=parse_modes("segmented"), lengths=[need]).check_lengths(tokenizer)
