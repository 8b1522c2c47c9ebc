"""Head-policy calibration: the gated mixture against a float64 reference (forward and gradients), the head that
needs history is the one chosen, the written table round-trips (save/load, HF both ways, ``calibrated:`` specs),
resumption learns the same gates, and bad flags fail in one line naming the flag."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_model
from tiny_models import tiny_config as shared_tiny_config
from tool_scripts import load_tool

from segtrain.attention import segment_attention
from segtrain.calibrate import GatedAttention, GateLearner, HeadGates, calibrate_dir
from segtrain.calibrate.job import STATE_FILE, CalibrationOptions
from segtrain.calibrate.options import fitted
from segtrain.calibrate.stop import CalibrationStopped, StopSignals
from segtrain.checkpoint import load_config, load_pretrained, save_pretrained
from segtrain.checkpoint.calibration import budget_edge, calibrated_table, select_heads
from segtrain.checkpoint.hf import PolicyArgumentError, parse_policy_arg
from segtrain.cli import main
from segtrain.convert import from_hf, to_hf
from segtrain.data.tokenizer import load_tokenizer
from segtrain.models.llama import LlamaForCausalLM
from segtrain.policy import HeadPolicy, PolicyError, PolicyTable

VOCAB = 800
ROOT = Path(__file__).resolve().parents[1]


tiny_config = functools.partial(
    shared_tiny_config, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_heads=4,
    history_policy={"fraction": 0.5}, attention_backend="math"
)  # fmt: skip


def tiny_model(seed: int = 0, **fields) -> LlamaForCausalLM:
    return make_model(tiny_config(**fields), seed)


@pytest.fixture(scope="module")
def tok(make_tokenizer):
    return make_tokenizer(VOCAB, 200_000)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    """A portable tiny model with its tokenizer."""
    path = tmp_path_factory.mktemp("model") / "src"
    model = tiny_model()
    save_pretrained(model, model.config, path)
    tok.save(path)
    return path


FAST = ["--seq-length", "256", "--tasks", "passkey", "--workers", "0", "--no-progress"]


# ---- the gated mixture ---------------------------------------------------------------------------


def random_qkv(T=40, Hq=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, T, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv)]


def gated(alpha: torch.Tensor, bounded="sink:2+window:3", S=8, backend="math") -> GatedAttention:
    from segtrain.attention import SegmentAttention

    gates = HeadGates(1, alpha.shape[-1], dtype=torch.float64)
    with torch.no_grad():
        gates.alpha.copy_(alpha)
    original = SegmentAttention(segment_size=S, policy="none", n_kv_heads=alpha.shape[-1], backend=backend)
    return GatedAttention(original, bounded, gates)


@pytest.mark.parametrize("backend", ["math", "reference"])
def test_gated_attention_mixes_each_query_head_by_its_kv_heads_gate(backend):
    q, k, v = random_qkv()
    alpha = torch.tensor([[0.3, 0.8]], dtype=torch.float64)
    out = gated(alpha, backend=backend)(q, k, v)
    full = segment_attention(q, k, v, segment_size=8, policy="all", backend="reference")
    bounded = segment_attention(q, k, v, segment_size=8, policy="sink:2+window:3", backend="reference")
    assert not torch.allclose(full, bounded)  # history matters here, so a wrong mixture would show
    for h in range(4):  # GQA: query heads 0, 1 share KV head 0; 2, 3 share KV head 1
        a = alpha[0, h // 2]
        torch.testing.assert_close(out[:, h], a * full[:, h] + (1 - a) * bounded[:, h], rtol=1e-12, atol=1e-12)


def test_gated_attention_gradients_match_finite_differences():
    q, k, v = random_qkv(T=20, D=4)
    module = gated(torch.zeros(1, 2, dtype=torch.float64), S=4)
    q = q.requires_grad_()
    alpha = torch.tensor([[0.35, 0.6]], dtype=torch.float64, requires_grad=True)

    def f(q, alpha):
        return torch.func.functional_call(module, {"gates.alpha": alpha}, (q, k, v))

    assert torch.autograd.gradcheck(f, (q, alpha), eps=1e-6, atol=1e-7, fast_mode=True)


def test_gated_attention_keeps_bfloat16_out_and_float32_gate_gradients():
    q, k, v = (t.to(torch.bfloat16) for t in random_qkv(T=24))
    module = gated(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    module.gates.float()
    out = module(q, k, v)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    assert module.gates.alpha.grad.dtype == torch.float32 and module.gates.alpha.grad.abs().min() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_gated_attention_on_gpu_matches_float64_math(backend):
    """The GPU path of calibration (bfloat16, flex/flash kernels, backward through both calls) against float64 math."""
    q, k, v = random_qkv(T=1024, Hq=8, Hkv=4, D=64)
    alpha = torch.tensor([[0.2, 0.9, 0.5, 0.0]], dtype=torch.float64)
    ref = gated(alpha, bounded="sink:64+window:128", S=256)
    q64 = q.clone().requires_grad_()
    ref(q64, k, v).pow(2).sum().backward()
    module = gated(alpha, bounded="sink:64+window:128", S=256, backend=backend).cuda().float()
    qb = q.to("cuda", torch.bfloat16).requires_grad_()
    out = module(qb, k.to("cuda", torch.bfloat16), v.to("cuda", torch.bfloat16))
    out.float().pow(2).sum().backward()
    torch.testing.assert_close(out.double().cpu(), ref(q, k, v).detach(), rtol=0.03, atol=0.03)
    got, want = module.gates.alpha.grad.double().cpu(), ref.gates.alpha.grad
    assert ((got - want).norm() / want.norm()) < 0.03, (got, want)
    assert ((qb.grad.double().cpu() - q64.grad).norm() / q64.grad.norm()) < 0.03


# ---- choosing heads ------------------------------------------------------------------------------


def test_select_heads_takes_the_largest_gates_over_the_whole_model():
    gates = [[0.1, 0.9], [0.9, 0.5]]
    assert select_heads(gates, 0.5) == [[False, True], [True, False]]
    assert select_heads(gates, 0.25) == [[False, True], [False, False]]  # the tie goes to the earlier layer
    assert select_heads(gates, 0.75) == [[False, True], [True, True]]
    assert select_heads(gates, 1.0) == [[True, True], [True, True]]
    assert select_heads(gates, 0.01) == [[False, True], [False, False]]  # at least one head
    assert budget_edge(gates, 0.5) == (0.9, 0.5) and budget_edge(gates, 0.25) == (0.9, 0.9) and budget_edge(gates, 1) is None
    table = calibrated_table(gates, 0.5, "sink:4+window:8")
    assert table.to_spec() == [["sink:4+window:8", "all"], ["all", "sink:4+window:8"]]
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(PolicyError, match="budget"):
            select_heads(gates, bad)
    with pytest.raises(PolicyError, match="reads all history"):
        calibrated_table(gates, 0.5, "all")


@pytest.mark.parametrize("live", [(0, 1), (1, 0)])
def test_calibration_chooses_the_head_whose_output_needs_history(live):
    """Every KV head but ``live`` has a zero value projection: its output is 0 whatever it reads, so only the live
    head's output changes when it loses history, and only its gate may stay up."""
    model = tiny_model(segment_size=8)
    D = model.config.head_dim
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            for head in range(2):
                if (layer, head) != live:
                    block.self_attn.v_proj.weight[head * D : (head + 1) * D] = 0
    learner = GateLearner(model, "none", lr=0.05)
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, -8:] = True
    losses = [learner.step(torch.randint(4, VOCAB, (2, 64), generator=g), mask)["distill"] for _ in range(40)]
    assert losses[0] < 1e-12  # every gate 1: the student is the teacher
    gates = learner.gates.alpha.detach()
    assert gates[live] > 0.5, gates
    assert sum(gates.flatten() > 0.05) == 1, gates
    chosen = select_heads(gates.tolist(), 0.25)
    assert [(i, h) for i in range(2) for h in range(2) if chosen[i][h]] == [live]


# ---- the command and its outputs -----------------------------------------------------------------


def test_calibrate_an_hf_dir_then_convert_both_ways(tmp_path, model_dir, capsys):
    hf_dir = to_hf(model_dir, tmp_path / "hf", progress=False)
    out = tmp_path / "calibrated"
    rc = main(["calibrate", "--model", str(hf_dir), "--out", str(out), "--steps", "3", "--segment-size", "32",
               "--bounded", "sink:2+window:8", *FAST])  # fmt: skip
    assert rc == 0
    assert "1 of 4 KV heads read all history, the rest sink:2+window:8" in capsys.readouterr().out
    record = json.loads((out / "calibration.json").read_text())
    assert len(record["gates"]) == 2 and all(len(row) == 2 for row in record["gates"])
    assert record["budget"] == 0.25 and record["bounded"] == "sink:2+window:8" and len(record["distill"]) == 3
    assert record["budget_edge"] == list(budget_edge(record["gates"], 0.25))
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "calibration.json"):
        assert (out / name).is_file(), name
    table = calibrated_table(record["gates"], 0.25, "sink:2+window:8")
    assert record["policy"] == table.to_spec()
    # Only history_policy (and the calibrated segment size) changed; the weights are the source's bytes.
    config, source = load_config(out), load_config(hf_dir)
    assert config.policy_table() == table and config.segment_size == 32
    assert {**config.to_dict(), "history_policy": None, "segment_size": None} == {
        **source.to_dict(),
        "history_policy": None,
        "segment_size": None,
    }
    written, original = load_file(out / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert sorted(written) == sorted(original) and all(torch.equal(written[n], original[n]) for n in original)
    assert load_pretrained(out).config.policy_table() == table
    # The table through HF and back.
    back = from_hf(to_hf(out, tmp_path / "hf2", progress=False), tmp_path / "back", progress=False)
    assert load_config(tmp_path / "hf2").policy_table() == table and load_config(back).policy_table() == table
    # calibrated:PATH applies the saved choice to the original HF dir; @BUDGET re-picks.
    assert main(["convert", "--from", "hf", str(hf_dir), str(tmp_path / "applied"), "--no-progress",
                 "--policy", f"calibrated:{out}"]) == 0  # fmt: skip
    assert load_config(tmp_path / "applied").policy_table() == table
    half = parse_policy_arg(f"calibrated:{out / 'calibration.json'}@0.5")
    assert half == calibrated_table(record["gates"], 0.5, "sink:2+window:8").to_spec()
    assert sum(p == "all" for row in half for p in row) == 2


def test_calibrated_policy_arg_errors(tmp_path, model_dir, capsys):
    with pytest.raises(PolicyArgumentError, match="no calibration.json"):
        parse_policy_arg(f"calibrated:{tmp_path}")
    (tmp_path / "calibration.json").write_text(json.dumps({"format": "segtrain-calibration", "format_version": 1,
                                                           "gates": [[0.5, 0.1]], "budget": 0.5, "bounded": "none"}))  # fmt: skip
    assert parse_policy_arg(f"calibrated:{tmp_path}") == [["all", "none"]]
    with pytest.raises(PolicyError, match="@BUDGET: must be a fraction in"):
        parse_policy_arg(f"calibrated:{tmp_path}@2")
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from", "hf", str(model_dir), str(tmp_path / "x"), "--policy", f"calibrated:{tmp_path}/nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --policy" in err and "nope: no calibration.json" in err


def test_resumed_calibration_learns_the_same_gates(tmp_path, model_dir):
    options = CalibrationOptions(seq_length=256, tasks=("passkey",), steps=4, bounded="none")
    kwargs = dict(workers=0, progress=False, save_every=1)
    straight = calibrate_dir(model_dir, tmp_path / "straight", options, **kwargs)
    assert calibrate_dir(model_dir, tmp_path / "resumed", options, stop_at=2, **kwargs) is None
    state = json.loads((tmp_path / "resumed" / STATE_FILE).read_text())
    assert state["step"] == 2 and len(state["distill"]) == 2
    other = CalibrationOptions(seq_length=256, tasks=("passkey",), steps=4, bounded="sink:2+window:8")
    with pytest.raises(ValueError, match="--out: .* holds a calibration with bounded='none' \\(now 'sink:2\\+window:8'\\)"):
        calibrate_dir(model_dir, tmp_path / "resumed", other, **kwargs)
    resumed = calibrate_dir(model_dir, tmp_path / "resumed", options, **kwargs)
    assert resumed["gates"] == straight["gates"] and resumed["distill"] == straight["distill"]
    assert not (tmp_path / "resumed" / STATE_FILE).exists()
    with pytest.raises(ValueError, match="--out: .* exists"):  # a finished output is not overwritten by accident
        calibrate_dir(model_dir, tmp_path / "resumed", options, **kwargs)


def test_activation_checkpointing_learns_the_same_gates(tmp_path, model_dir, monkeypatch):
    """``--activation-checkpointing`` goes through the portable assembly (segtrain.speed): every layer recomputed, the
    same gates and distillation losses."""
    import segtrain.speed.portable as assembly

    assembled, parallelize = [], assembly.parallelize_portable
    monkeypatch.setattr(assembly, "parallelize_portable", lambda model, **kw: assembled.append(parallelize(model, **kw)))
    options = CalibrationOptions(seq_length=256, tasks=("passkey",), steps=3, bounded="none")
    kwargs = dict(workers=0, progress=False)
    plain = calibrate_dir(model_dir, tmp_path / "plain", options, **kwargs)
    assert assembled == []
    recomputed = calibrate_dir(model_dir, tmp_path / "recomputed", options, activation_checkpointing=True, **kwargs)
    assert [layer.checkpoint for layer in assembled[0].model.layers] == ["layer"] * len(assembled[0].model.layers)
    assert len(plain["distill"]) == 3 and any(d > 0 for d in plain["distill"])
    for key in ("distill", "gates"):
        torch.testing.assert_close(torch.tensor(recomputed[key]), torch.tensor(plain[key]), rtol=1e-6, atol=1e-7, msg=key)


BAD_FLAGS = [
    (["--budget", "0"], "--budget: must be a fraction in (0, 1]"),
    (["--budget", "1.5"], "--budget: must be a fraction in (0, 1]"),
    (["--bounded", "sink:x"], "--bounded: bad history policy"),
    (["--bounded", "all"], "--bounded: 'all' reads all history"),
    (["--bounded", "sink:4+window:1000"], "--bounded: 'sink:4+window:1000' reads all 224 history keys"),
    (["--seq-length", "32"], "--seq-length: 32 tokens at segment size 16 leave no history to calibrate"),
    (["--seq-length", "60"], "--seq-length: too short for the tasks: 61 tokens are too few"),
    (["--seq-length", "60", "--bounded", "sink:64+window:1024"], "--bounded: 'sink:64+window:1024' reads all 32 history"),
    (["--tasks", "passkey,sudoku"], "--tasks: unknown task 'sudoku'"),
    (["--task-options", "{digits: 2}"], "--task-options: not JSON"),
    (["--task-options", '{"needle": {"digits": 2}}'], "--task-options: must map some of the tasks"),
    (["--task-options", '{"passkey": {"digitz": 2}}'], "--task-options: passkey.digitz: not an option of task 'passkey'"),
    (["--steps", "0"], "--steps: must be a positive integer"),
    (["--tokenizer", "/nonexistent/tok.model"], "--tokenizer: /nonexistent/tok.model does not exist"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_fail_in_one_line_naming_the_flag(tmp_path, model_dir, capsys, flags, message):
    rc = main(["calibrate", "--model", str(model_dir), "--out", str(tmp_path / "out"), *FAST, "--bounded", "none", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("segtrain calibrate: error: " + message), err
    assert not (tmp_path / "out").exists()


def test_a_model_dir_without_weights_fails_naming_model(tmp_path, model_dir, capsys):
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(model_dir / "config.json", empty / "config.json")
    for path, message in (
        (empty, f"--model: no model.safetensors in {empty}"),
        (tmp_path / "nope", "--model: " + str(tmp_path / "nope") + " does not exist"),
        (model_dir / "config.json", "--model: " + str(model_dir / "config.json") + " is not a directory"),
    ):
        rc = main(["calibrate", "--model", str(path), "--out", str(tmp_path / "out"), *FAST])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("segtrain calibrate: error: " + message), err


def test_defaults_fit_the_model():
    """Left out, --seq-length is a few segments (more when the tasks need more, fewer within the model's positions)
    and --bounded keeps sink:64+window:1024 within a segment: the old fixed 16384 tokens on a 16-token-segment toy
    ran no step in minutes."""
    defaults = CalibrationOptions()
    assert (defaults.seq_length, defaults.bounded) == (None, None)
    big = fitted(defaults, 4096, 131072, 400)
    assert (big.seq_length, big.bounded) == (16384, "sink:64+window:1024")  # the 1B shape keeps the old defaults
    toy = fitted(defaults, 16, 4096, 347)
    assert (toy.seq_length, toy.bounded) == (448, "sink:4+window:8")  # 347 tokens needed, a quarter spare, 28 segments
    assert fitted(defaults, 512, 1536, 400).seq_length == 1536  # within the 1536 positions the model has
    assert fitted(defaults, 512, 1536, 1500).seq_length == 2048  # unless the tasks need more
    given = CalibrationOptions(seq_length=256, bounded="none")
    assert fitted(given, 16, 4096, 9999) == given


def test_calibrate_with_defaults_runs_on_a_tiny_model(tmp_path, model_dir, capsys):
    rc = main(["calibrate", "--model", str(model_dir), "--out", str(tmp_path / "out"), "--steps", "2", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert record["seq_length"] % 16 == 0 and 64 <= record["seq_length"] <= 1024 and record["bounded"] == "sink:4+window:8"
    assert f"{record['seq_length']} tokens per sample (segments of 16); bounded heads sink:4+window:8" in err
    assert "calibrate 2/2 (100%)" in err and "\r" not in err  # progress lines (stderr is not a terminal here)


def test_stop_signals_stop_at_once_before_learning_and_after_the_step_while_learning():
    with StopSignals() as stop:
        with pytest.raises(CalibrationStopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises first
        assert stopped.value.saved_step is None and stopped.value.exit_status == 143
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert stop.signum == signal.SIGINT
            with pytest.raises(CalibrationStopped):  # a second signal does not wait
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_before_learning_writes_nothing(tmp_path, model_dir, monkeypatch):
    from segtrain.calibrate import job

    def interrupted(*args):  # Ctrl-C while the model and tokenizer load
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    monkeypatch.setattr(job, "load_model_tokenizer", interrupted)
    with pytest.raises(CalibrationStopped) as stopped:
        calibrate_dir(model_dir, tmp_path / "out", CalibrationOptions(steps=2), workers=0, progress=False)
    assert stopped.value.saved_step is None and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_a_resumable_state(tmp_path, model_dir):
    """SIGTERM to the whole process group (as Slurm, Kubernetes or `timeout` send it: the data loader worker gets it
    too) while learning: the step finishes, the state is saved, the exit status is 143; the same command continues."""
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "segtrain", "calibrate", "--model", str(model_dir), "--out", str(out), "--tasks",
               "passkey", "--steps", "100000", "--save-every", "100000", "--workers", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, stderr=stderr, stdout=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + 240
        while "calibrate 1/100000" not in log.read_text():  # the first step is done
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    err = log.read_text()
    state = json.loads((out / STATE_FILE).read_text())
    assert rc == 143, err
    assert f"stopped by SIGTERM: the state of step {state['step']} of 100000 is in {out}" in err
    assert state["step"] >= 1 and "Traceback" not in err and "\r" not in err
    assert sorted(p.name for p in out.iterdir()) == [STATE_FILE]
    resumed = subprocess.run([*command, "--stop-at", str(state["step"] + 1)], env=env, capture_output=True, text=True,
                             timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / STATE_FILE).read_text())["step"] == state["step"] + 1


def test_check_bounded_accepts_bounded_policies():
    from segtrain.checkpoint.calibration import check_bounded

    assert check_bounded("none", 256, 16) == HeadPolicy()
    assert check_bounded("sink:64+window:1024", 16384, 2048) == HeadPolicy(sink=64, window=1024)
    with pytest.raises(PolicyError, match="no query has history"):
        check_bounded("none", 32, 16)


def test_calibration_study_script_runs_end_to_end(tmp_path, model_dir, capsys):
    """tools/calibration_study.py (the GPU measurement) on the tiny model, CPU: every phase, its outputs and table."""
    study = load_tool("calibration_study")
    rc = study.main(["--model", str(model_dir), "--out", str(tmp_path), "--seq-length", "256", "--steps", "2",
                     "--samples", "5", "--eval-batch", "2", "--device", "cpu", "--workers", "0", "--bounded", "none",
                     "--bounded", "sink:2+window:8", "--calibration-tasks", "passkey", "--eval-tasks", "passkey"])  # fmt: skip
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    arms = ["full"] + [f"{arm}/{p}" for p in ("none", "sink:2+window:8") for arm in ("first-k", "calibrated", "bounded")]
    assert list(results["arms"]) == arms
    for arm in arms:
        accuracy = results["arms"][arm]["accuracy"]["passkey"]
        assert sum(n for _, n in accuracy.values()) == 5 and all(0 <= c <= n for c, n in accuracy.values())
    assert results["arms"]["calibrated/none"]["policy"] == load_config(tmp_path / "calibrated-none").policy_table().to_spec()
    assert results["arms"]["full"]["all_heads"] == 4 and results["arms"]["bounded/none"]["all_heads"] == 0
    assert set(results["calibration"]) == {"none", "sink:2+window:8"}
    assert {"calibration_s", "eval_setup_s", "total_s"} <= set(results["timing"])
    assert "| calibrated/none |" in capsys.readouterr().out

    # The scorer: a model that predicts each next token is always right, one that repeats the current token never.
    class Oracle(LlamaForCausalLM):
        shift = 1

        def forward(self, input_ids, logits_positions=None, **_):
            return torch.nn.functional.one_hot(input_ids.gather(1, logits_positions + self.shift), VOCAB).float()

    samples = study.eval_samples("passkey", load_tokenizer(model_dir), 256, 5, seed=1)
    distances = [study.distance(s) for s in samples]
    assert distances == sorted(distances, reverse=True) and len(set(distances)) == 5  # depths spread evenly
    oracle, table = Oracle(tiny_config()), PolicyTable.uniform(2, 2, "none")
    right = study.score(oracle, table, samples, [64, 128], 2, "cpu")
    assert sum(n for _, n in right.values()) == 5 and all(c == n for c, n in right.values()), right
    oracle.shift = 0
    assert all(c == 0 for c, _ in study.score(oracle, table, samples, [64, 128], 2, "cpu").values())
