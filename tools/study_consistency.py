"""The paper's claim, reproduced small: consistent segment training matches full attention on long-context retrieval.

Small Llama models trained from the same init, data, seed and step count at T tokens on a blend of
natural text (the embedded corpus) and the synthetic retrieval tasks (needles at every distance).
The common init is itself trained first (``--init-steps``): at ``--init-length`` tokens, one segment
(plain causal attention, which every arm computes at that length), so that retrieval forms at short
range before the arms train at T; one init per candidate synthetic-loss setting (``--init-losses``:
loss on the answer tokens only, or on every token of a synthetic sample), and the one that retrieves
best at its length is every arm's init (run 1, from a random init with answer-only loss, learned no
retrieval in 1000 steps: docs/results/run1). The arms:

- ``A``: full attention training (one segment of T tokens, every head ``all``: plain causal attention);
- ``B``: segtrain, 25% of KV heads ``all``, the rest ``none``, segment size S;
- ``C``: segtrain, every head ``none`` (what the carried previous segment alone gives);
- ``D``: like B with the previous segment's K/V detached too (``model.carry_grad: false``);
- ``Bw`` (``--arms`` adds it): like B, the other heads ``sink:64+window:1024`` instead of ``none``.

A is evaluated in full mode and segmented with B's policy (segmented only at inference, as
StreamingLLM / DuoAttention-style serving does); B, C, D in their own mode; each at T and 2T. A and B
run with two seeds so the noise level shows. Arms train concurrently (several per GPU, time-sliced)
to a fixed, equal step count with periodic checkpoints; a wall-clock guard stops training early if
the budget runs out and still evaluates (the latest checkpoint every arm has) and writes the results.

    python tools/study_consistency.py --prepare-data .study_data          # CPU, once: corpus, tokenizer, indexed data
    python tools/study_consistency.py --data .study_data --out OUT --work /tmp/study --gpus 2 --budget-s 470
    python tools/study_consistency.py --report-from OUT/results.json --doc docs/results/consistency.md
    python tools/study_consistency.py --smoke --out /tmp/smoke           # the whole pipeline on CPU, tiny

``OUT`` receives six files: results.json, consistency.md, retrieval.png, ppl.png, train_loss.png, study.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: segtrain from this checkout

B_POLICY = {"fraction": 0.25, "policy": "all", "rest": "none"}
ARMS = {
    # name: (segment size (None: T, one segment), policy, carry_grad, seed)
    "A-s0": (None, "all", True, 0),
    "A-s1": (None, "all", True, 1),
    "B-s0": ("S", B_POLICY, True, 0),
    "B-s1": ("S", B_POLICY, True, 1),
    "C": ("S", "none", True, 0),
    "D": ("S", B_POLICY, False, 0),
    "Bw": ("S", {"fraction": 0.25, "policy": "all", "rest": "sink:64+window:1024"}, True, 0),
}
DEFAULT_ARMS = "A-s0,A-s1,B-s0,B-s1,C,D"
TASKS = ("passkey", "needle", "recall")
OUTPUT_FILES = ("results.json", "consistency.md", "retrieval.png", "ppl.png", "train_loss.png", "study.log")


@dataclass
class Arm:
    name: str
    segment_size: int
    policy: str | dict
    carry_grad: bool
    seed: int

    @property
    def family(self) -> str:
        return self.name.split("-")[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--prepare-data", metavar="DIR", help="build corpus, tokenizer and indexed train/held-out data into DIR, then exit"
    )
    p.add_argument("--report-from", metavar="JSON", help="regenerate the markdown (--doc) from a results.json, then exit")
    p.add_argument("--doc", default=str(ROOT / "docs/results/consistency.md"), help="with --report-from: where the markdown goes")
    p.add_argument("--smoke", action="store_true", help="tiny model, short sequences, all arms, CPU: checks the pipeline")
    p.add_argument("--data", help="a folder made by --prepare-data (default: built under --work)")
    p.add_argument("--out", default="runs/study", help="the six result files")
    p.add_argument("--work", help="training runs and checkpoints (default: OUT/../study_work)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, from {list(ARMS)}")
    p.add_argument("--gpus", type=int, default=None, help="devices to spread arms over (default: all CUDA GPUs; CPU: 1)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for everything; results are written in time")
    p.add_argument("--eval-reserve-s", type=float, default=150.0, help="of the budget, kept for evaluation and the report")
    # model and training (defaults: the GPU run)
    p.add_argument("--seq-length", type=int, default=16384, help="T: training length (evaluated at T and 2T)")
    p.add_argument("--segment-size", type=int, default=2048, help="S of the segmented arms")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--intermediate-size", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192, help="tokenizer and model vocabulary (--prepare-data)")
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--init-steps", type=int, default=1500, help="steps of the common init (0: the arms start from random)")
    p.add_argument("--init-length", type=int, default=2048, help="sequence length of the common init (one segment)")
    p.add_argument("--init-micro-batch", type=int, default=8)
    p.add_argument("--init-losses", default="answers,all", help="candidate data.synthetic_loss settings of the common init")
    p.add_argument("--init-budget-s", type=float, default=None,
                   help="a cap on the common init's time (default: none; it trains its --init-steps within the budget, and "
                   "if it cannot, the study stops with an error rather than starting the arms from random weights)")  # fmt: skip
    p.add_argument("--init-model", help="a model dir every arm starts from instead of training a common init")
    p.add_argument("--synthetic-loss", default="answers", help="with --init-model: answers or all (the arms' synthetic loss)")
    p.add_argument("--recall-queries", type=int, default=16, help="training recall samples: keys asked per sample")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"synthetic tasks trained and evaluated, from {list(TASKS)}")
    p.add_argument("--task-options", default="{}",
                   help='JSON per task, for training and evaluation alike, e.g. \'{"passkey": {"digits": 2}}\'')  # fmt: skip
    p.add_argument("--init-range", type=float, default=0.02, help="model.initializer_range (std of the initial weights)")
    p.add_argument("--calibrate-steps", type=int, default=0,
                   help="also calibrate each A arm's heads (segtrain calibrate: budget 0.25, the rest none) for this many "
                   "steps and evaluate A segmented with them (0: no calibration)")  # fmt: skip
    p.add_argument("--save-every", type=int, default=100, help="checkpoint period (what the guard can fall back to)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--synthetic-fraction", type=float, default=0.5)
    p.add_argument("--loss-average", default="token", choices=("token", "sample"),
                   help="data.loss_average: sample weighs a synthetic sample's answers like a whole text sample")  # fmt: skip
    p.add_argument("--backend", default="auto", help="attention backend of every arm (auto: flex on CUDA, math on CPU)")
    # evaluation
    p.add_argument("--samples", type=int, default=30, help="samples per task and length (a third per distance bucket)")
    p.add_argument("--ppl-sequences", type=int, default=4)
    p.add_argument("--eval-batch", type=int, default=6)
    p.add_argument("--eval-workers-per-gpu", type=int, default=2)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000, help="--prepare-data: corpus size")
    p.add_argument("--heldout-fraction", type=float, default=0.15, help="--prepare-data: documents kept out of training")
    p.add_argument("--eval-worker", help=argparse.SUPPRESS)  # internal: a JSON job file
    args = p.parse_args(argv)
    if args.smoke:
        if args.arms == DEFAULT_ARMS:  # A and B (the verdict) and D (the loop without carry gradient): a cheap check
            args.arms = "A-s0,B-s0,D"
        smoke = dict(
            seq_length=512,
            segment_size=128,
            hidden_size=32,
            intermediate_size=64,
            layers=2,
            heads=8,
            kv_heads=4,
            vocab=1000,
            steps=4,
            init_steps=3,
            init_length=512,
            init_losses="all",
            recall_queries=4,
            calibrate_steps=2,
            init_micro_batch=2,
            warmup=1,
            samples=3,
            ppl_sequences=1,
            eval_batch=3,
            corpus_bytes=300_000,
            eval_workers_per_gpu=1,
            budget_s=min(args.budget_s, 300.0),
            init_budget_s=90.0,
            eval_reserve_s=60.0,
        )
        for key, value in smoke.items():
            setattr(args, key, value)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or any(t not in TASKS for t in args.tasks):
        p.error(f"--tasks: choose from {list(TASKS)}, got {args.tasks}")
    from segtrain.data.synthetic import SyntheticError, parse_task_options

    try:
        extra = parse_task_options(args.task_options)
    except SyntheticError as e:
        p.error(str(e))
    if any(t not in TASKS or not isinstance(o, dict) for t, o in extra.items()):
        p.error("--task-options: a JSON object mapping task names to objects of options")
    args.task_options = {"recall": {"num_pairs": max(16, args.recall_queries), "num_queries": args.recall_queries}}
    for task, own in extra.items():
        args.task_options[task] = {**args.task_options.get(task, {}), **own}
    args.task_options = {t: o for t, o in args.task_options.items() if t in args.tasks}  # the tasks trained and evaluated
    return args


def selected_arms(args) -> list[Arm]:
    names = [n.strip() for n in args.arms.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm {unknown[0]!r}; choose from {list(ARMS)}")
    out = []
    for name in names:
        size, policy, carry, seed = ARMS[name]
        out.append(Arm(name, args.seq_length if size is None else args.segment_size, policy, carry, seed))
    return out


# ---- data ----------------------------------------------------------------------------------------


def prepare_data(out: Path, corpus_bytes: int, vocab: int, heldout_fraction: float) -> Path:
    """Corpus (the standard library's text), split by document (the last ``heldout_fraction`` held out),
    a tokenizer trained on the training split, and both splits as indexed datasets. Idempotent."""
    from segtrain.data.corpus import write_embedded_corpus
    from segtrain.data.indexed import preprocess
    from segtrain.data.tokenizer import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    done = out / "data.json"
    if done.is_file():
        return out
    corpus = write_embedded_corpus(out / "corpus.jsonl", corpus_bytes)
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    cut = len(lines) - max(1, round(heldout_fraction * len(lines)))
    (out / "train.jsonl").write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
    (out / "heldout.jsonl").write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
    corpus.unlink()
    tok = train_tokenizer([out / "train.jsonl"], out / "tokenizer", vocab_size=vocab)
    stats = {
        split: preprocess([out / f"{split}.jsonl"], tok.model_file, out / split, workers=2, progress=False)
        for split in ("train", "heldout")
    }
    info = {
        "vocab": vocab,
        "documents": {"train": cut, "heldout": len(lines) - cut},
        "tokens": {k: v["tokens"] for k, v in stats.items()},
    }
    done.write_text(json.dumps(info, indent=1) + "\n")
    return out


# ---- training ------------------------------------------------------------------------------------


def train_config(
    arm: Arm,
    args,
    data: Path,
    run_dir: Path,
    device: str,
    *,
    synthetic_loss: str = "answers",
    seq_length: int | None = None,
    steps: int | None = None,
    micro_batch: int | None = None,
) -> dict:
    seq_length, steps = seq_length or args.seq_length, steps or args.steps
    save_every = max(1, min(args.save_every, steps))
    return {
        "model": {
            "vocab_size": args.vocab,
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "num_layers": args.layers,
            "num_heads": args.heads,
            "num_kv_heads": args.kv_heads,
            "rope_theta": args.rope_theta,
            "tie_word_embeddings": True,
            "max_position_embeddings": seq_length,
            "segment_size": arm.segment_size,
            "history_policy": arm.policy,
            "attention_backend": args.backend,
            "carry_grad": arm.carry_grad,
            "initializer_range": args.init_range,
        },
        "data": {
            # --synthetic-fraction 1: the synthetic tasks alone (no text to blend)
            **(
                {"prefixes": [str(data / "train")], "split": "100,0,0", "synthetic_fraction": args.synthetic_fraction}
                if args.synthetic_fraction < 1
                else {}
            ),  # fmt: skip
            "tokenizer": str(data / "tokenizer" / "tokenizer.model"),
            "seq_length": seq_length,
            "synthetic": "+".join(args.tasks),
            "synthetic_loss": synthetic_loss,
            "loss_average": args.loss_average,
            "synthetic_options": args.task_options,
        },
        "steps": steps,
        "micro_batch_size": micro_batch or args.micro_batch,
        "grad_accum": 1,
        "seed": arm.seed,
        "log_every": max(1, min(10, args.steps // 20)),
        "save_every": save_every,
        "keep_last": 0,
        "out_dir": str(run_dir),
        "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": args.warmup, "weight_decay": 0.1},
        "parallel": {"zero_stage": 1 if device == "cuda" else 0, "precision": "bf16" if device == "cuda" else "fp32"},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(device: str, slot: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(_free_port())}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    if device == "cuda":  # slot counts the devices this process sees (CUDA_VISIBLE_DEVICES=1 keeps a study on GPU 1)
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[slot] if slot < len(visible) else str(slot)
    else:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _stop(procs: list[subprocess.Popen], log) -> None:
    """SIGTERM each process group we started, then SIGKILL what is left after 10 s."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        os.killpg(p.pid, signal.SIGTERM)
    end = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if running:
        log(f"stopped {len(running)} process(es)")


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the study process dies, however it dies, so that a killed study
    leaves no orphan training on (each child checkpoints on SIGTERM) and its rerun cannot race one."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _spawn(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    """``cmd`` in its own process group (so :func:`_stop` reaches its children), output into ``log_path``."""
    with open(log_path, "a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)  # fmt: skip
    SPAWNED.append(proc)
    return proc


SPAWNED: list[subprocess.Popen] = []  # every process this study started: a signal handler stops the live ones


def _wait(procs: list[subprocess.Popen], deadline: float) -> None:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.5)


def _tail(log_path: Path, lines: int = 15) -> str:
    return "\n  " + "\n  ".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def _steps_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def train_arms(
    arms: list[Arm],
    args,
    data: Path,
    work: Path,
    device: str,
    slots: int,
    deadline: float,
    log,
    *,
    configs: dict | None = None,
    init_from: Path | dict | None = None,
) -> dict:
    """All arms at once (round robin over ``slots`` devices); stops them at ``deadline``. Returns per-arm status.
    ``configs``: each arm's train config (default :func:`train_config`); ``init_from``: the arms' common init, or a
    model dir per arm name."""
    import yaml

    threads = max(1, (os.cpu_count() or 2) // max(1, len(arms)))
    procs, status = {}, {}
    for i, arm in enumerate(arms):
        run_dir = work / arm.name
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_dir / "train.yaml"
        cfg = configs[arm.name] if configs else train_config(arm, args, data, run_dir, device)
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "segtrain.cli", "train", "--config", str(config), "--no-progress", "--resume", "auto"]
        start = init_from.get(arm.name) if isinstance(init_from, dict) else init_from
        if start is not None:
            cmd += ["--init-from", str(start)]
        procs[arm.name] = _spawn(cmd, run_dir / "train.log", _env(device, i % slots, threads))
        status[arm.name] = {"slot": i % slots, "command": shlex.join(cmd)}
    log(f"training {len(arms)} arms on {slots} {device} slot(s): {', '.join(a.name for a in arms)}")
    last_report = 0.0
    while any(p.poll() is None for p in procs.values()):
        if time.monotonic() > deadline:
            log("training budget spent: stopping the arms still running; evaluating their latest common checkpoint")
            _stop([p for p in procs.values() if p.poll() is None], log)
            break
        if time.monotonic() - last_report > 30:
            last_report = time.monotonic()
            log("steps: " + ", ".join(f"{a.name} {_steps_done(work / a.name)}" for a in arms))
        time.sleep(1.0)
    for arm in arms:
        p, run_dir = procs[arm.name], work / arm.name
        status[arm.name].update(returncode=p.returncode, steps_done=_steps_done(run_dir), finished=(run_dir / "final").is_dir())
        stopped = (0, None, -signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM)  # 143: segtrain train's own SIGTERM exit
        if p.returncode not in stopped and not status[arm.name]["finished"]:
            log(f"{arm.name}: training failed (exit {p.returncode}):" + _tail(run_dir / "train.log"))
    return status


def model_sources(arms: list[Arm], work: Path, status: dict) -> dict:
    """What each arm is evaluated from: ``final`` when every arm finished, else the newest step all arms checkpointed
    (equal steps), else each arm's own newest checkpoint (said so in the results)."""

    def steps(arm):
        ck = work / arm.name / "checkpoints"
        return (
            {int(p.name.split("_")[1]): p for p in ck.glob("step_*") if (p / "trainer_state.json").is_file()}
            if ck.is_dir()
            else {}
        )

    found = {a.name: steps(a) for a in arms}
    if all(status[a.name]["finished"] for a in arms):
        return {
            a.name: {"path": str(work / a.name / "final"), "step": status[a.name]["steps_done"], "equal_steps": True}
            for a in arms
        }
    common = set.intersection(*(set(s) for s in found.values())) if found else set()
    if common:
        step = max(common)
        return {a.name: {"path": str(found[a.name][step]), "step": step, "equal_steps": True} for a in arms}
    out = {}
    for a in arms:
        if found[a.name]:
            step = max(found[a.name])
            out[a.name] = {"path": str(found[a.name][step]), "step": step, "equal_steps": False}
    return out


def train_common_init(args, data: Path, work: Path, device: str, slots: int, log, deadline: float | None = None
                      ) -> tuple[Path | None, str, dict]:  # fmt: skip
    """Train one init per candidate synthetic-loss setting at ``--init-length`` (one segment), score each on retrieval
    at that length, and return ``(the best one's model dir, its loss setting, a report)``; ``(None, ...)`` when no
    candidate finished in its budget (the arms then start from random weights, as the report says)."""
    losses = [x.strip() for x in args.init_losses.split(",") if x.strip()]
    inits = [Arm(f"init-{loss}", args.init_length, "all", True, 0) for loss in losses]
    configs = {
        a.name: train_config(
            a,
            args,
            data,
            work / a.name,
            device,
            synthetic_loss=loss,
            seq_length=args.init_length,
            steps=args.init_steps,
            micro_batch=args.init_micro_batch,
        )  # fmt: skip
        for a, loss in zip(inits, losses)
    }
    cap = time.monotonic() + args.init_budget_s if args.init_budget_s else float("inf")
    status = train_arms(inits, args, data, work, device, slots, min(cap, deadline or float("inf")), log, configs=configs)
    finished = [a for a in inits if status[a.name]["finished"]]
    report = {"candidates": {a.name: {"synthetic_loss": loss, **status[a.name]} for a, loss in zip(inits, losses)}}
    if not finished:
        log("no common init finished in its budget")
        return None, losses[0], {**report, "chosen": None}
    jobs = [{"arm": a.name, "label": "full", "mode": {"kind": "full"}, "source": str(work / a.name / "final")} for a in finished]
    records = evaluate_arms(jobs, args, data, work, device, slots, time.monotonic() + 90, log, lengths=[args.init_length],
                            perplexity=False, tag="init_eval")  # fmt: skip
    scores = {r["model"]: _mean_accuracy(r) or 0.0 for r in records if "skipped" not in r}
    best = max(finished, key=lambda a: (scores.get(a.name, 0.0), -inits.index(a)))
    for a in inits:
        report["candidates"][a.name]["retrieval_accuracy"] = scores.get(a.name)
    log("common init: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in scores.items()) + f"; every arm starts from {best.name}")
    return work / best.name / "final", losses[inits.index(best)], {**report, "chosen": best.name, "records": records}


# ---- evaluation ----------------------------------------------------------------------------------


CALIBRATED = "segmented (calibrated)"


def calibrate_arms(
    arms: list[Arm], sources: dict, args, data: Path, work: Path, device: str, slots: int, deadline: float, log
) -> dict:
    """``segtrain calibrate`` each finished A arm (one process per arm, spread over the devices): gates learned on the
    study's own tasks at T and S, the top 25% of KV heads read all history and the rest none, like B. Returns
    ``{arm: {"path", "seconds", "all_heads"}}`` for the calibrations that finished."""
    todo = [a for a in arms if a.family == "A" and a.name in sources]
    procs = {}
    for i, arm in enumerate(todo):
        out, model = work / f"{arm.name}-calibrated", Path(sources[arm.name]["path"])
        if model.name != "final":  # a training checkpoint (the guard stopped training): calibrate reads model dirs
            model = work / f"{arm.name}-hf"
            convert = [sys.executable, "-m", "segtrain", "convert", "--to", "hf", sources[arm.name]["path"], str(model),
                       "--overwrite", "--no-progress"]  # fmt: skip
            done = subprocess.run(convert, cwd=ROOT, env=_env("cpu", 0, 2), capture_output=True, text=True)
            if done.returncode:
                log(f"calibration of {arm.name}: converting its checkpoint failed: {done.stderr.strip()[-500:]}")
                continue
        cmd = [sys.executable, "-m", "segtrain", "calibrate", "--model", str(model), "--out", str(out),
               "--tokenizer", str(data / "tokenizer" / "tokenizer.model"),
               "--budget", str(B_POLICY["fraction"]), "--bounded", B_POLICY["rest"], "--seq-length", str(args.seq_length),
               "--segment-size", str(args.segment_size), "--tasks", ",".join(args.tasks),
               "--task-options", json.dumps(args.task_options),
               "--steps", str(args.calibrate_steps), "--batch-size", str(args.micro_batch), "--seed", str(arm.seed + 100),
               "--no-progress", "--overwrite", "--workers", "1"]  # fmt: skip
        procs[arm.name] = _spawn(cmd, work / f"{arm.name}-calibrate.log", _env(device, i % slots, 2))
    if procs:
        log(f"calibrating {', '.join(procs)}: {args.calibrate_steps} steps each")
    _wait(list(procs.values()), deadline)
    _stop(list(procs.values()), log)
    done = {}
    for name, p in procs.items():
        out = work / f"{name}-calibrated"
        if p.returncode == 0 and (out / "calibration.json").is_file():
            record = json.loads((out / "calibration.json").read_text())
            done[name] = {"path": str(out), "seconds": record.get("seconds"), "all_heads": record.get("all_heads")}
        else:
            log(f"calibration of {name} did not finish (exit {p.returncode}):" + _tail(work / f"{name}-calibrate.log", 8))
    return done


def eval_jobs(arms: list[Arm], sources: dict, args, calibrated: dict | None = None) -> list[dict]:
    """(arm, mode) jobs: A in full mode, segmented with B's policy and (when calibrated) with its calibrated heads;
    the others in their own mode."""
    jobs = []
    for name, cal in (calibrated or {}).items():
        jobs.append({"arm": name, "label": CALIBRATED, "mode": {"kind": "segmented"}, "source": cal["path"]})
    for arm in arms:
        if arm.name not in sources:
            continue
        modes = [("own", {"kind": "segmented"})]
        if arm.family == "A":
            modes = [
                ("full", {"kind": "full"}),
                ("segmented (B policy)", {"kind": "segmented", "segment_size": args.segment_size, "policy": B_POLICY}),
            ]
        for label, mode in modes:
            jobs.append({"arm": arm.name, "label": label, "mode": mode, "source": sources[arm.name]["path"]})
    return jobs


def run_eval_worker(job_file: str) -> int:
    """Evaluate a list of jobs in this process (one device), appending each record to the job file's output as it ends."""
    import torch

    from segtrain.data.tokenizer import load_tokenizer
    from segtrain.eval.evaluate import EvalPlan, evaluate
    from segtrain.eval.load import load_model
    from segtrain.eval.modes import ExecutionMode

    spec = json.loads(Path(job_file).read_text())
    out = Path(spec["output"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(spec["tokenizer"])
    cache: dict = {}
    for length in spec["lengths"]:  # every job at T first: the longer lengths are the first to go when time runs out
        for job in spec["jobs"]:
            if time.time() > spec["deadline_unix"]:
                record = {"skipped": "out of time", "mode": job["label"], "length": length}
            else:
                model, _ = load_model(job["source"], device=device, dtype=dtype)
                plan = EvalPlan(
                    modes=[ExecutionMode(**job["mode"])],
                    lengths=[length],
                    tasks=spec["tasks"],
                    task_options=spec["task_options"],
                    samples=spec["samples"],
                    batch_size=spec["batch_size"],
                    bucket_size=spec["bucket_size"],
                    ppl_data=spec["ppl_data"],
                    ppl_sequences=spec["ppl_sequences"],
                )
                record = evaluate(model, tokenizer, plan, progress=False, cache=cache)[0]
                record["mode"] = job["label"]
                del model
            with open(out, "a") as f:
                f.write(json.dumps({"model": job["arm"], **record}) + "\n")
    return 0


def evaluate_arms(
    jobs: list[dict],
    args,
    data: Path,
    work: Path,
    device: str,
    slots: int,
    deadline: float,
    log,
    *,
    lengths: list[int] | None = None,
    perplexity: bool = True,
    tag: str = "eval",
) -> list[dict]:
    lengths = lengths or [args.seq_length, 2 * args.seq_length]
    workers = max(1, min(len(jobs), slots * args.eval_workers_per_gpu))
    # contiguous chunks of jobs sorted by execution: a worker compiles attention for few (length, segment size) shapes
    jobs = sorted(jobs, key=lambda j: (j["mode"]["kind"], json.dumps(j["mode"].get("policy")), j["arm"]))
    per = -(-len(jobs) // workers)
    chunks = [jobs[i * per : (i + 1) * per] for i in range(workers)]
    procs, outputs = [], []
    for w, chunk in enumerate(c for c in chunks if c):
        out = work / f"{tag}_{w}.jsonl"
        out.unlink(missing_ok=True)
        spec = {
            "jobs": chunk,
            "lengths": lengths,
            "samples": args.samples,
            "batch_size": args.eval_batch,
            "bucket_size": args.segment_size,
            "ppl_data": str(data / "heldout") if perplexity else None,
            "ppl_sequences": args.ppl_sequences,
            "tasks": args.tasks,
            "task_options": args.task_options,
            "tokenizer": str(data / "tokenizer" / "tokenizer.model"),
            "deadline_unix": time.time() + (deadline - time.monotonic()) - 5,
            "output": str(out),
        }
        job_file = work / f"{tag}_{w}.json"
        job_file.write_text(json.dumps(spec, indent=1))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--eval-worker", str(job_file)]
        procs.append(_spawn(cmd, work / f"{tag}_{w}.log", _env(device, w % slots, max(1, (os.cpu_count() or 2) // workers))))
        outputs.append(out)
    log(f"evaluating {len(jobs)} (model, mode) jobs at {lengths} tokens in {len(procs)} worker(s)")
    _wait(procs, deadline)
    if any(p.poll() is None for p in procs):
        log("evaluation budget spent: stopping the workers; writing what was measured")
        _stop(procs, log)
    for w, p in enumerate(procs):
        if p.returncode:
            log(f"eval worker {w} exited {p.returncode}:" + _tail(work / f"{tag}_{w}.log"))
    records = [json.loads(line) for out in outputs if out.is_file() for line in out.read_text().splitlines() if line.strip()]
    order = {(j["arm"], j["label"]): i for i, j in enumerate(sorted(jobs, key=lambda j: j["arm"]))}
    records.sort(key=lambda r: (r["length"], order.get((r["model"], r["mode"]), 0)))
    measured = {(r["model"], r["mode"], r["length"]) for r in records}
    for job in jobs:  # jobs a stopped worker never reached
        for length in lengths:
            if (job["arm"], job["label"], length) not in measured:
                records.append({"model": job["arm"], "mode": job["label"], "length": length, "skipped": "out of time"})
    return records


# ---- outputs -------------------------------------------------------------------------------------


def loss_curves(arms: list[Arm], work: Path) -> dict:
    curves = {}
    for arm in arms:
        metrics = work / arm.name / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            curves[arm.name] = [[r["step"], r["loss"]] for r in rows if "loss" in r]
    return curves


def plot_losses(curves: dict, path: Path) -> None:
    from segtrain.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows in curves.items():
        if rows:
            ax.plot([r[0] for r in rows], [r[1] for r in rows], label=name, alpha=0.85)
    ax.set(xlabel="step", ylabel="training loss (blend of text and synthetic answers)", yscale="log")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_accuracy(record: dict, buckets=("own", "previous", "history")) -> float | None:
    cells = [c for task in (record.get("retrieval") or {}).values() for b, c in task.items() if b in buckets]
    total = sum(c["total"] for c in cells)
    return sum(c["correct"] for c in cells) / total if total else None


def verdict(results: dict) -> list[str]:
    """What the numbers say about the claim, by a rule stated in the text (history-bucket accuracy at T)."""
    T = results["study"]["seq_length"]
    rec = {(r["model"], r["mode"]): r for r in results["records"] if r.get("length") == T and "skipped" not in r}

    def acc(family: str, mode: str) -> list[float]:
        return [
            a
            for (m, md), r in rec.items()
            if m.split("-")[0] == family and md == mode
            if (a := _mean_accuracy(r, ("history",))) is not None
        ]

    a_full, a_seg, b = acc("A", "full"), acc("A", "segmented (B policy)"), acc("B", "own")
    a_cal = acc("A", CALIBRATED)
    if not (a_full and a_seg and b):
        return ["Not enough arms were measured at T to compare A and B (see the tables)."]

    def mean(xs):
        return sum(xs) / len(xs)

    spread = max(max(a_full) - min(a_full), max(b) - min(b), 0.05)
    lines = [
        f"History-bucket accuracy at T={T} (mean over tasks and seeds): A full {100 * mean(a_full):.0f}%, "
        f"A segmented at inference {100 * mean(a_seg):.0f}%, B (segtrain) {100 * mean(b):.0f}%; "
        f"noise level (largest seed-to-seed difference, at least 5 points) {100 * spread:.0f} points.",
    ]
    if a_cal:
        lines.append(
            f"A segmented at inference with calibrated heads (the same 25% budget, chosen by `segtrain calibrate` instead "
            f"of the first heads of each layer): {100 * mean(a_cal):.0f}%."
        )
    matches = abs(mean(b) - mean(a_full)) <= spread or mean(b) > mean(a_full)
    loses = mean(a_seg) < mean(a_full) - spread
    if mean(a_full) < 0.2 and mean(b) < 0.2:
        lines.append(
            "Neither A nor B learned to retrieve from history at this scale and step count: the run cannot "
            "test the claim (train longer or bigger)."
        )
    elif matches and loses:
        lines.append(
            "The claim reproduces: B matches A's full-attention accuracy within the noise, and A loses accuracy "
            "when segmented only at inference."
        )
    else:
        lines.append(
            "The claim does not reproduce here: "
            + ("B does not match A in full mode" if not matches else "")
            + (" and " if not matches and not loses else "")
            + ("A segmented at inference does not lose more than the noise" if not loses else "")
            + "."
        )
    return lines


def _init_lines(init: dict) -> list[str]:
    if init.get("model"):
        return [f"- Init: every arm starts from the model dir `{init['model']}`."]
    if not init.get("steps"):
        return ["- Init: random (the same seed-0 weights for every arm of a seed)."]
    cands = init.get("candidates") or {}
    scored = ", ".join(
        f"synthetic loss on {c['synthetic_loss']}: "
        + (f"{100 * c['retrieval_accuracy']:.0f}%" if c.get("retrieval_accuracy") is not None else "not finished")
        for c in cands.values()
    )
    chosen = init.get("chosen")
    return [
        f"- Common init: {init['steps']} steps of {init['micro_batch']} sequences of {init['length']} tokens, one segment "
        f"(plain causal attention, which every arm computes at that length), same blend; one candidate per synthetic-loss "
        f"setting, scored on retrieval at {init['length']} tokens ({scored}); "
        + (f"every arm starts from `{chosen}` and keeps its loss setting." if chosen else "none finished: random init.")
    ]


def _trained_options(s: dict) -> dict:
    return {t: o for t, o in (s.get("task_options") or {}).items() if t in s.get("tasks", TASKS)}


def _calibration_lines(cal: dict | None) -> list[str]:
    if not cal:
        return []
    done = ", ".join(
        f"{name}: {len(c.get('all_heads') or [])} heads, {c.get('seconds') or 0:.0f} s" for name, c in cal["arms"].items()
    )
    return [
        f"- Calibration: `segtrain calibrate` on each A arm ({cal['steps']} steps on the training tasks at T and S, "
        f"budget 0.25, the other heads `none`), then A evaluated segmented with those heads ({done or 'none finished'})."
    ]


def text_epochs(s: dict) -> float:
    """How many times the longest-trained arm read the training split's text (0 when the study did not record the
    data)."""
    train_tokens = ((s.get("data") or {}).get("tokens") or {}).get("train")
    if not train_tokens:
        return 0.0
    steps = max((a.get("steps_done") or 0 for a in (s.get("arms") or {}).values()), default=s["steps"])
    return steps * s["micro_batch"] * s["seq_length"] * (1 - s["synthetic_fraction"]) / train_tokens


def render_doc(results: dict) -> str:
    from segtrain.eval.report import markdown

    s = results["study"]
    cut = s.get("cut") or []  # the first line says when the time guard cut the study short
    lines = [
        *([f"**CUT SHORT by the time guard (--budget-s):** {' '.join(cut)}", ""] if cut else []),
        "# Consistent segment training vs full attention (small-scale reproduction)",
        "",
        "Generated by `tools/study_consistency.py` from `results.json` "
        "(regenerate: `python tools/study_consistency.py --report-from results.json`).",
        "",
        "Claim under test: a model trained with the segment-wise forward it is served with matches full-attention "
        "quality on long-context retrieval, while a full-attention model segmented only at inference loses quality.",
        "",
        "## Result",
        "",
        *verdict(results),
        "",
    ]
    notes = list(s.get("notes") or [])
    if s.get("synthetic_fraction", 0) >= 1:
        notes.append("No natural text was trained on (--synthetic-fraction 1): the perplexity table is not meaningful.")
    elif text_epochs(s) > 4:
        notes.append(
            f"The longest-trained arm read the {s['data']['tokens']['train']:,} tokens of training text about "
            f"{text_epochs(s):.0f} times: "
            "held-out perplexity here measures how much each arm memorised, not its language-model quality."
        )
    if notes:
        lines += ["**Notes:** " + " ".join(notes), ""]
    lines += [
        "## Setup",
        "",
        f"- Device: {s['device']}; started {s['started']}; wall time {s['timings']['total_s']:.0f} s "
        f"(data {s['timings'].get('data_s', 0):.0f} s, training {s['timings'].get('train_s', 0):.0f} s, "
        f"evaluation {s['timings'].get('eval_s', 0):.0f} s).",
        f"- Model: Llama, d={s['model']['hidden_size']}, {s['model']['num_layers']} layers, {s['model']['num_heads']} heads, "
        f"{s['model']['num_kv_heads']} KV heads, vocab {s['model']['vocab_size']}, {s['parameters'] / 1e6:.1f}M parameters, "
        f"rope_theta {s['model']['rope_theta']:g}, {s['precision']}, attention backend `{s['backend']}`.",
        f"- Training: T={s['seq_length']}, S={s['segment_size']}, {s['steps']} steps of {s['micro_batch']} sequence(s), lr "
        f"{s['lr']:g} (warmup {s['warmup']}, cosine to lr/10); data: {100 * (1 - s['synthetic_fraction']):.0f}% natural "
        "text (the training split of the Python standard library's docstrings and source; perplexity on the held-out split), "
        f"{100 * s['synthetic_fraction']:.0f}% synthetic {'/'.join(s.get('tasks', TASKS))} with needles at random depths "
        f"(every distance; options {json.dumps(_trained_options(s))}); "
        f"initial weights N(0, {s.get('init_range', 0.02):g}); loss averaged per {s.get('loss_average', 'token')}; "
        "synthetic samples carry loss "
        + ("on every token." if s.get("synthetic_loss") == "all" else "on the answer tokens only."),
        *_init_lines(s.get("init") or {}),
        *_calibration_lines(s.get("calibration")),
        f"- Evaluation: {s['samples']} samples per task and length (a third aimed at each distance bucket), exact "
        "greedy answers scored by one teacher-forced forward; perplexity on "
        f"{s['ppl_sequences']} held-out sequences per length; prefill through the segmented engine, batch 1.",
        "- Distance buckets (relative to the segment of the query): `own` (same segment), `previous` (the carried "
        "segment), `history` (older: only heads with a history policy can read it).",
        "",
        "| arm | segment size | history policy | carry gradient | seed | steps trained | evaluated at step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, arm in s["arms"].items():
        lines.append(
            f"| {name} | {arm['segment_size']} | `{json.dumps(arm['policy'])}` | {arm['carry_grad']} | {arm['seed']} | "
            f"{arm.get('steps_done') or 0} | {arm.get('evaluated_step') or '-'} |"
        )
    lines += [
        "",
        "## Tables",
        "",
        markdown(results["records"]),
        "## Plots",
        "",
        "![accuracy by distance](consistency_retrieval.png) ![perplexity by position](consistency_ppl.png) "
        "![training loss](consistency_train_loss.png)",
        "",
        "## Commands",
        "",
        "```bash",
        *s["commands"],
        "```",
        "",
    ]
    return "\n".join(lines)


def write_outputs(results: dict, out: Path, arms, work: Path) -> None:
    from segtrain.checkpoint.atomic import write_text_atomic
    from segtrain.eval.report import plot_ppl, plot_retrieval

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(out / "consistency.md", render_doc(results))
    plot_retrieval([r for r in results["records"] if r.get("length") == results["study"]["seq_length"]], out / "retrieval.png")
    plot_ppl(results["records"], out / "ppl.png")
    plot_losses(results["study"]["loss_curves"], out / "train_loss.png")


def report_from(json_path: str, doc: str) -> int:
    """Regenerate the doc (and copy the plots beside it, as ``consistency_*.png``) from a results.json."""
    import shutil

    results = json.loads(Path(json_path).read_text())
    doc_path = Path(doc)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render_doc(results))
    src = Path(json_path).parent
    for name in ("retrieval.png", "ppl.png", "train_loss.png"):
        if (src / name).is_file():
            shutil.copyfile(src / name, doc_path.parent / f"consistency_{name}")
    if Path(json_path).resolve() != (doc_path.parent / "consistency.json").resolve():
        shutil.copyfile(json_path, doc_path.parent / "consistency.json")
    print(f"wrote {doc_path}")
    return 0


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    if args.eval_worker:
        return run_eval_worker(args.eval_worker)
    if args.report_from:
        return report_from(args.report_from, args.doc)
    if args.prepare_data:
        path = prepare_data(Path(args.prepare_data), args.corpus_bytes, args.vocab, args.heldout_fraction)
        print(f"data ready in {path}: {(path / 'data.json').read_text().strip()}")
        return 0
    import torch

    deadline = start + args.budget_s
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "study_work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "study.log", "a")  # noqa: SIM115 (open for the whole run)

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - start:6.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    from segtrain.attention.backends import check_trains

    try:  # every arm trains with it: a backend without a backward here would fail in each child
        check_trains(args.backend, torch.device(device))
    except ValueError as e:
        raise SystemExit(f"--backend: {e}") from None
    slots = args.gpus or (torch.cuda.device_count() if device == "cuda" else 1)
    arms = selected_arms(args)
    notes = []
    t = time.monotonic()
    data = Path(args.data) if args.data else work / "data"
    if not (data / "data.json").is_file():
        log(f"preparing data in {data} (carry a --prepare-data folder to skip this)")
    prepare_data(data, args.corpus_bytes, args.vocab, args.heldout_fraction)
    vocab = json.loads((data / "data.json").read_text())["vocab"]
    if vocab != args.vocab:
        log(f"--vocab {args.vocab} differs from the data's tokenizer ({vocab}): using {vocab}")
        args.vocab = vocab
    timings = {"data_s": time.monotonic() - t}
    init_dir, synthetic_loss, init_report = None, args.synthetic_loss, {}
    if args.init_model:
        init_dir, init_report = Path(args.init_model), {"model": args.init_model}
    elif args.init_steps > 0:
        t = time.monotonic()
        init_dir, synthetic_loss, init_report = train_common_init(args, data, work, device, slots, log,
                                                                  deadline - args.eval_reserve_s)  # fmt: skip
        timings["init_s"] = time.monotonic() - t
        if init_dir is None:  # the arms would silently start from random weights: not the study that was asked for
            raise SystemExit(
                f"study_consistency: error: the common init did not finish its {args.init_steps} steps within the budget "
                f"(--budget-s {args.budget_s:g}, --init-budget-s {args.init_budget_s}); raise them, lower --init-steps, "
                f"or pass --init-steps 0 to start the arms from random weights (logs: {work}/init-*/train.log)"
            )
    t = time.monotonic()
    configs = {a.name: train_config(a, args, data, work / a.name, device, synthetic_loss=synthetic_loss) for a in arms}
    status = train_arms(arms, args, data, work, device, slots, deadline - args.eval_reserve_s, log, configs=configs,
                        init_from=init_dir)  # fmt: skip
    timings["train_s"] = time.monotonic() - t
    sources = model_sources(arms, work, status)
    if any(not s["equal_steps"] for s in sources.values()):
        notes.append(
            "Training ran out of budget before every arm reached a common checkpoint: arms are evaluated at unequal steps."
        )
    elif not all(status[a.name]["finished"] for a in arms):
        step = next(iter(sources.values()))["step"] if sources else 0
        notes.append(
            f"Training ran out of budget: every arm is evaluated at step {step} of {args.steps} (the newest common checkpoint)."
        )
    missing = [a.name for a in arms if a.name not in sources]
    if missing:
        notes.append(f"No checkpoint at all for {', '.join(missing)}: not evaluated.")
    cut = list(notes)  # every note so far says the time guard stopped training early
    for note in notes:
        log(note)
    t = time.monotonic()
    calibrated = {}
    if args.calibrate_steps > 0:
        t = time.monotonic()
        calibrated = calibrate_arms(arms, sources, args, data, work, device, slots, deadline - args.eval_reserve_s / 2, log)
        timings["calibrate_s"] = time.monotonic() - t
    jobs = eval_jobs(arms, sources, args, calibrated)
    records = evaluate_arms(jobs, args, data, work, device, slots, deadline - 10, log) if jobs else []
    timings["eval_s"] = time.monotonic() - t
    skipped = sorted({f"{r['model']} {r['mode']} @{r['length']}" for r in records if "skipped" in r})
    if skipped:
        notes.append(f"Evaluation ran out of budget; not measured: {', '.join(skipped)}.")
        cut.append(notes[-1])
    from segtrain.config import ModelConfig
    from segtrain.models.llama import LlamaForCausalLM

    model_cfg = train_config(arms[0], args, data, work, device)["model"]
    with torch.device("meta"):
        n_params = LlamaForCausalLM(ModelConfig(**{**model_cfg, "segment_size": args.segment_size})).num_parameters()
    timings["total_s"] = time.monotonic() - start
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    results = {
        "study": {
            "device": f"{slots} x {device_name}" if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - timings["total_s"])),
            "timings": timings,
            "notes": notes,
            "cut": cut,
            "commands": [
                *([f"python tools/study_consistency.py --prepare-data {args.data}  # on a CPU first"] if args.data else []),
                shlex.join(["python", "tools/study_consistency.py", *(argv or sys.argv[1:])]),
            ],
            "model": model_cfg,
            "parameters": n_params,
            "precision": "bf16" if device == "cuda" else "fp32",
            "backend": args.backend,
            "seq_length": args.seq_length,
            "segment_size": args.segment_size,
            "steps": args.steps,
            "micro_batch": args.micro_batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "synthetic_fraction": args.synthetic_fraction,
            "data": json.loads((data / "data.json").read_text()) if (data / "data.json").is_file() else None,
            "synthetic_loss": synthetic_loss,
            "loss_average": args.loss_average,
            "recall_queries": args.recall_queries,
            "tasks": args.tasks,
            "task_options": args.task_options,
            "init_range": args.init_range,
            "init": {
                "steps": 0 if args.init_model else args.init_steps,
                "length": args.init_length,
                "micro_batch": args.init_micro_batch,
                **{k: v for k, v in init_report.items() if k != "records"},
            },
            "samples": args.samples,
            "ppl_sequences": args.ppl_sequences,
            "calibration": {"steps": args.calibrate_steps, "arms": calibrated} if args.calibrate_steps else None,
            "arms": {
                a.name: {
                    **asdict(a),
                    **{k: status[a.name].get(k) for k in ("steps_done", "returncode")},
                    "evaluated_step": sources.get(a.name, {}).get("step"),
                }
                for a in arms
            },
            "loss_curves": loss_curves(arms, work),
            "init_records": init_report.get("records", []),
        },
        "records": records,
    }
    write_outputs(results, out, arms, work)
    log(f"done in {time.monotonic() - start:.0f}s: {', '.join(OUTPUT_FILES)} in {out}")
    log_file.close()
    print(Path(out / "consistency.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
