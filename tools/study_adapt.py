"""Adapting a pretrained full-attention model to segmented serving: how many consistent fine-tuning steps it needs.

The consistency study's small Llama (tools/study_consistency.py: its data, model, training and evaluation pieces,
imported here) in phases, each a fixed number of steps:

1. ``init``: the common init (one segment at ``--init-length``: plain causal attention), trained here.
2. From it, concurrently: ``A-s*`` (full attention at T, ``--steps``), ``As-s*`` (full attention at T/4 with 4x the
   sequences per step, ``(1 - --ext-fraction)`` of A's steps) and ``B-s*`` (segtrain from the init: the 2T reference).
3. ``segtrain calibrate`` on each A's final model (gates on the study's tasks; 25% of KV heads ``all``, the rest
   ``none``, like B's policy).
4. Concurrently: ``E-s*``, A fine-tuned with B's policy (first-k heads) for ``max(--fractions)`` of A's steps at a
   constant LR after warmup, a checkpoint at each fraction (the recovery curve; 0% is A segmented at inference);
   ``Ecal-s*``, the same from the calibrated heads; ``Xfull-s*`` / ``Xseg-s*``, As extended to T for ``--ext-fraction``
   of A's steps with full attention / with B's policy (the same steps and tokens as each other; As + X cost what A
   costs in tokens).
5. Evaluation at T and 2T per distance bucket, then the report (markdown, results.json, plots) from results.json.

Every phase, arm, checkpoint and evaluation that finished is skipped on a rerun with the same ``--work``; a training
arm resumes from its newest checkpoint. ``--deadline-s`` (or SIGTERM) stops the running arms with a checkpoint, writes
the partial report (its first line says so) and exits 0 with "not finished, rerun to continue".

    python tools/study_consistency.py --prepare-data .study_data                      # CPU, once
    python tools/study_adapt.py --data .study_data --work runs/adapt_work --out OUT --deadline-s 540   # rerun until done
    python tools/study_adapt.py --report-from OUT/results.json --doc docs/results/adapt.md
    python tools/study_adapt.py --smoke --work /tmp/adapt_smoke --out /tmp/adapt_smoke/out      # CPU, tiny

Any flag of tools/study_consistency.py (model shape, data blend, evaluation) is accepted and means the same here;
the defaults are the consistency study's small model (5.5M parameters, T=1024, S=128, passkey with 2 digits).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the consistency study's pieces
import study_consistency as sc  # noqa: E402

ROOT = sc.ROOT
OUTPUT_FILES = ("results.json", "adapt.md", "recovery.png", "train_loss.png", "study.log")
FIRST_K = "segmented (first-k heads)"  # A segmented at inference with B's policy: E at 0%
CALIBRATED = sc.CALIBRATED  # A segmented at inference with its calibrated heads: E-cal at 0%
# Aggregate training throughput of the small model on one H100/H200, several arms time-sliced per GPU, from the
# consistency study: 6 arms x 16000 steps of 8 x 1024 tokens in 336 s on 2 H200 = 143 arm-steps/s per GPU.
EXPECTED_ARM_STEPS_PER_S = 140.0
STARTUP_S = 40.0  # per phase: processes start, attention compiles
# The GPU run's settings: the consistency study's run (docs/results/consistency.md), steps sized for ~12 GPU minutes.
DEFAULTS = [
    "--seq-length", "1024", "--segment-size", "128", "--hidden-size", "256", "--intermediate-size", "768",
    "--layers", "4", "--heads", "4", "--kv-heads", "4", "--init-range", "0.06", "--lr", "3e-3", "--warmup", "50",
    "--synthetic-fraction", "0.5", "--loss-average", "sample", "--tasks", "passkey",
    "--task-options", '{"passkey":{"digits":2}}', "--init-length", "256", "--init-micro-batch", "32",
    "--init-steps", "1000", "--init-losses", "answers", "--steps", "5000", "--micro-batch", "8", "--save-every", "500",
    "--samples", "60", "--ppl-sequences", "16", "--eval-batch", "20", "--eval-workers-per-gpu", "3",
    "--calibrate-steps", "200",
]  # fmt: skip


RECORDED_ARGS = (
    "seq_length", "segment_size", "steps", "micro_batch", "lr", "warmup", "ft_lr", "ft_warmup", "fractions",
    "ext_fraction", "seeds", "b_seeds", "synthetic_fraction", "synthetic_loss", "tasks", "task_options", "samples",
    "init_steps", "init_length", "init_micro_batch", "calibrate_steps",
)  # fmt: skip


class StudyError(Exception):
    """A failure the user can act on; main prints it as one line."""


class Interrupted(Exception):
    """SIGTERM / SIGINT: checkpoint, report and exit 0."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other flags: those of tools/study_consistency.py.")  # fmt: skip
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop (with checkpoints) this many seconds after the start and exit 0; rerun to continue")  # fmt: skip
    p.add_argument("--seeds", type=int, default=2, help="seeds of A, As, E, E-cal, Xfull, Xseg")
    p.add_argument("--b-seeds", type=int, default=1, help="seeds of B from scratch (the 2T reference; 0: none)")
    p.add_argument("--fractions", default="0.05,0.1,0.25,0.5", help="E's checkpoints, as fractions of A's steps")
    p.add_argument("--ft-lr", type=float, default=None, help="E's constant learning rate after warmup (default: --lr / 3)")
    p.add_argument("--ft-warmup", type=int, default=None, help="E's warmup steps (default: --warmup)")
    p.add_argument("--ext-fraction", type=float, default=0.25,
                   help="the extension's steps at T, as a fraction of A's (As trains the rest of A's steps at T/4)")  # fmt: skip
    p.add_argument(
        "--cost-steps",
        type=int,
        default=60,
        help="steps of Xfull-s0 and Xseg-s0 rerun alone on a device for their wall time and peak memory (0: skip)",
    )
    p.add_argument("--cost-worker", help=argparse.SUPPRESS)  # internal: a JSON job file
    p.add_argument("--plan", action="store_true", help="print the runs, their step counts and the expected time, then exit")
    p.add_argument("--report-from", metavar="JSON", help="regenerate the markdown (--doc) and plots from a results.json")
    p.add_argument("--doc", default=str(ROOT / "docs/results/adapt.md"), help="with --report-from: where the markdown goes")
    own, rest = p.parse_known_args(argv)
    if own.report_from or own.cost_worker:
        return own
    smoke = "--smoke" in rest
    args = sc.parse_args((["--tasks", "passkey"] if smoke else DEFAULTS) + rest)  # smoke: T/4 is too short for needle
    if args.eval_worker or args.prepare_data:
        return args
    for key, value in vars(own).items():
        setattr(args, key, value)
    if smoke:  # tiny on CPU: E's checkpoints at 1, 2, 5 and 10 steps
        for key, value in dict(steps=20, init_steps=4, init_length=128, init_micro_batch=4, save_every=5, samples=3).items():
            setattr(args, key, value)
    try:
        args.fractions = sorted({float(x) for x in args.fractions.split(",") if x.strip()})
    except ValueError:
        p.error(f"--fractions: comma-separated numbers in (0, 1], got {own.fractions!r}")
    if not args.fractions or not all(0 < f <= 1 for f in args.fractions):
        p.error(f"--fractions: comma-separated numbers in (0, 1], got {own.fractions!r}")
    if not 0 < args.ext_fraction < 1:
        p.error(f"--ext-fraction: must be in (0, 1), got {args.ext_fraction}")
    if args.seq_length % 4:
        p.error(f"--seq-length: T/4 must be a whole number of tokens, got T={args.seq_length}")
    if args.init_steps <= 0 and not args.init_model:
        p.error("--init-steps: the study adapts a trained model; it needs a common init (> 0 steps or --init-model)")
    if args.seeds < 1:
        p.error("--seeds: at least 1")
    args.ft_lr = args.ft_lr if args.ft_lr is not None else args.lr / 3
    args.ft_warmup = args.ft_warmup if args.ft_warmup is not None else args.warmup
    args.work = args.work or str(Path(args.out).parent / "adapt_work")
    return args


# ---- the plan -------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: its arm (name, segment size, policy, seed), its config and the model dir it starts from."""

    arm: sc.Arm
    config: dict
    init_from: Path | None = None
    checkpoints: dict = field(default_factory=dict)  # step -> label, evaluated from the checkpoint


def ft_steps(args) -> dict[float, int]:
    """E's checkpoint step for each fraction of A's steps (at least 1)."""
    return {f: max(1, round(f * args.steps)) for f in args.fractions}


def ext_steps(args) -> tuple[int, int]:
    """(As's steps at T/4, the extension's steps at T): together A's step count, at A's tokens per step."""
    ext = max(1, round(args.ext_fraction * args.steps))
    return max(1, args.steps - ext), ext


def plan(args, data: Path, work: Path, device: str, calibrated: dict | None = None) -> dict[str, list[Run]]:
    """Every training run of the study by phase; ``calibrated``: {A arm: calibration.json} (E-cal needs it)."""

    def run(name, size, policy, seed, init_from, **kw):
        arm = sc.Arm(name, size, policy, True, seed)
        config = sc.train_config(arm, args, data, work / name, device, synthetic_loss=args.synthetic_loss, **kw)
        return Run(arm, config, init_from)

    T, S = args.seq_length, args.segment_size
    init = run("init", args.init_length, "all", 0, None, seq_length=args.init_length, steps=args.init_steps,
               micro_batch=args.init_micro_batch)  # fmt: skip
    init_dir = Path(args.init_model) if args.init_model else work / "init" / "final"
    short, ext = ext_steps(args)
    seeds = range(args.seeds)
    base = [run(f"A-s{s}", T, "all", s, init_dir) for s in seeds]
    base += [run(f"As-s{s}", T // 4, "all", s, init_dir, seq_length=T // 4, steps=short, micro_batch=4 * args.micro_batch)
             for s in seeds]  # fmt: skip
    base += [run(f"B-s{s}", S, sc.B_POLICY, s, init_dir) for s in range(args.b_seeds)]
    checkpoints = ft_steps(args)
    steps = max(checkpoints.values())
    save_every = math.gcd(*checkpoints.values())
    finetune = []
    for s in seeds:
        a_final = work / f"A-s{s}" / "final"
        variants = [("E", sc.B_POLICY, a_final)]
        if calibrated and f"A-s{s}" in calibrated:
            variants.append(("Ecal", calibrated[f"A-s{s}"]["policy"], Path(calibrated[f"A-s{s}"]["path"])))
        for family, policy, start in variants:
            r = run(f"{family}-s{s}", S, policy, s, start, steps=steps)
            r.config["seed"] = 100 + s  # data A has not seen in that order
            r.config["optim"].update(lr=args.ft_lr, min_lr=args.ft_lr, warmup_steps=args.ft_warmup)  # constant after warmup
            r.config["save_every"] = save_every
            r.checkpoints = {step: f"{100 * f:g}%" for f, step in checkpoints.items()}
            finetune.append(r)
    for s in seeds:
        for family, size, policy in (("Xfull", T, "all"), ("Xseg", S, sc.B_POLICY)):
            finetune.append(run(f"{family}-s{s}", size, policy, s, work / f"As-s{s}" / "final", steps=ext))
    return {"init": [] if args.init_model else [init], "base": base, "finetune": finetune}


def expected_seconds(runs: list[Run], args) -> float:
    """Training time at the consistency study's throughput (arm-steps of 8 x 1024 tokens per second per GPU)."""
    work = sum(r.config["steps"] * r.config["micro_batch_size"] * r.config["data"]["seq_length"] for r in runs)
    return STARTUP_S + work / (8 * 1024) / EXPECTED_ARM_STEPS_PER_S if runs else 0.0


# ---- running --------------------------------------------------------------------------------------


class Study:
    def __init__(self, args, argv):
        import torch

        self.args, self.argv = args, argv
        self.start = time.monotonic()
        self.deadline = self.start + args.deadline_s if args.deadline_s else float("inf")
        self.out, self.work = Path(args.out), Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "study.log", "a")  # noqa: SIM115 (open for the whole run)
        self.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        self.slots = args.gpus or (torch.cuda.device_count() if self.device == "cuda" else 1)
        self.cut: list[str] = []  # what the deadline or a signal left undone
        self.data = Path(args.data) if args.data else self.work / "data"
        self.phases: dict[str, list[Run]] = {}
        self.calibrated: dict = {}
        self.timings = json.loads((self.work / "timings.json").read_text()) if (self.work / "timings.json").is_file() else {}

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def _time(self, key: str, seconds: float) -> None:
        """Accumulate a phase's seconds over reruns (work/timings.json)."""
        from segtrain.checkpoint.atomic import write_text_atomic

        self.timings[key] = self.timings.get(key, 0.0) + seconds
        write_text_atomic(self.work / "timings.json", json.dumps(self.timings, indent=1))

    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline - 5

    def train(self, phase: str, runs: list[Run]) -> bool:
        """Train the runs without a final model, concurrently; True when every run finished."""
        todo = [r for r in runs if not (self.work / r.arm.name / "final").is_dir()]
        if not todo:
            return True
        if self.out_of_time():
            self.cut.append(f"{phase}: not started ({', '.join(r.arm.name for r in todo)})")
            return False
        for r in todo:
            if r.init_from is not None and not r.init_from.is_dir():
                raise StudyError(f"{r.arm.name}: its start {r.init_from} is missing (an earlier phase did not finish)")
        self.log(f"{phase}: {len(todo)} run(s), expected ~{expected_seconds(todo, self.args):.0f} s of training at "
                 f"{EXPECTED_ARM_STEPS_PER_S:.0f} arm-steps of 8 x 1024 tokens per second per GPU")  # fmt: skip
        t = time.monotonic()
        status = sc.train_arms([r.arm for r in todo], self.args, self.data, self.work, self.device, self.slots,
                               self.deadline - 5, self.log, configs={r.arm.name: r.config for r in todo},
                               init_from={r.arm.name: r.init_from for r in todo})  # fmt: skip
        seconds = time.monotonic() - t
        self._time(f"{phase}_s", seconds)
        steps = sum(status[r.arm.name]["steps_done"] * r.config["micro_batch_size"] * r.config["data"]["seq_length"]
                    for r in todo) / (8 * 1024)  # fmt: skip
        self.log(f"{phase}: {steps / seconds:.0f} arm-steps of 8 x 1024 tokens per second over {self.slots} slot(s) "
                 f"(startup included; the plan assumed {EXPECTED_ARM_STEPS_PER_S:.0f} per GPU)")  # fmt: skip
        undone = [r.arm.name for r in todo if not status[r.arm.name]["finished"]]
        if undone and not self.out_of_time():
            logs = ", ".join(str(self.work / n / "train.log") for n in undone)
            raise StudyError(f"{phase}: {', '.join(undone)} stopped before their last step (exit "
                             f"{[status[n]['returncode'] for n in undone]}); see {logs}")  # fmt: skip
        if undone:
            self.cut.append(f"{phase}: " + ", ".join(f"{n} at step {status[n]['steps_done']}" for n in undone))
        return not undone

    def calibrate(self, runs: list[Run]) -> dict:
        """``segtrain calibrate`` on each A's final model (skipped when its calibration.json exists)."""
        a_runs = [r for r in runs if r.arm.family == "A"]
        todo = [r.arm for r in a_runs if not (self.work / f"{r.arm.name}-calibrated" / "calibration.json").is_file()]
        if todo and not self.out_of_time():
            t = time.monotonic()
            sources = {a.name: {"path": str(self.work / a.name / "final")} for a in todo}
            sc.calibrate_arms(todo, sources, self.args, self.data, self.work, self.device, self.slots, self.deadline - 5,
                              self.log)  # fmt: skip
            self._time("calibrate_s", time.monotonic() - t)
        done = {}
        for r in a_runs:
            path = self.work / f"{r.arm.name}-calibrated"
            if (path / "calibration.json").is_file():
                record = json.loads((path / "calibration.json").read_text())
                done[r.arm.name] = {"path": str(path), "policy": record["policy"], "all_heads": record.get("all_heads"),
                                    "seconds": record.get("seconds")}  # fmt: skip
        missing = [r.arm.name for r in a_runs if r.arm.name not in done]
        if missing and not self.out_of_time():
            raise StudyError(f"calibration of {', '.join(missing)} failed: see {self.work}/<arm>-calibrate.log")
        if missing:
            self.cut.append(f"calibration: {', '.join(missing)} not calibrated")
        return done

    def eval_jobs(self, phases: dict[str, list[Run]], calibrated: dict) -> list[dict]:
        """Every (model, mode) of the study whose source exists."""
        segmented = {"kind": "segmented", "segment_size": self.args.segment_size, "policy": sc.B_POLICY}
        jobs = []
        for r in phases["base"] + phases["finetune"]:
            name, final = r.arm.name, self.work / r.arm.name / "final"
            if r.arm.family == "As":
                continue  # the extension's start: measured through Xfull and Xseg
            if r.checkpoints:  # E, E-cal: each checkpoint of the recovery curve
                for step, label in r.checkpoints.items():
                    path = self.work / name / "checkpoints" / f"step_{step:08d}"
                    if (path / "trainer_state.json").is_file():
                        jobs.append({"arm": name, "label": label, "mode": {"kind": "segmented"}, "source": str(path)})
                continue
            if not final.is_dir():
                continue
            if r.arm.family == "A":
                jobs.append({"arm": name, "label": "full", "mode": {"kind": "full"}, "source": str(final)})
                jobs.append({"arm": name, "label": FIRST_K, "mode": segmented, "source": str(final)})
                if name in calibrated:
                    jobs.append({"arm": name, "label": CALIBRATED, "mode": {"kind": "segmented"},
                                 "source": calibrated[name]["path"]})  # fmt: skip
            else:
                mode = {"kind": "full"} if r.arm.family == "Xfull" else {"kind": "segmented"}
                jobs.append({"arm": name, "label": "full" if mode["kind"] == "full" else "own", "mode": mode,
                             "source": str(final)})  # fmt: skip
        return jobs

    def records(self) -> list[dict]:
        """Every measured record so far (work/records/*.jsonl: each evaluation call's workers append there)."""
        out = {}
        for path in sorted((self.work / "records").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if "skipped" not in r:
                        out[(r["model"], r["mode"], r["length"])] = r
        return list(out.values())

    def missing(self, jobs: list[dict]) -> dict[tuple[int, ...], list[dict]]:
        """The jobs not yet measured, grouped by the lengths each still lacks."""
        done = {(r["model"], r["mode"], r["length"]) for r in self.records()}
        groups: dict[tuple[int, ...], list[dict]] = {}
        for job in jobs:
            lengths = tuple(
                n for n in (self.args.seq_length, 2 * self.args.seq_length) if (job["arm"], job["label"], n) not in done
            )
            if lengths:
                groups.setdefault(lengths, []).append(job)
        return groups

    def evaluate(self, jobs: list[dict]) -> None:
        """Measure what is missing (T first: every job at T before any at 2T); records land in work/records."""
        (self.work / "records").mkdir(exist_ok=True)
        for lengths, todo in sorted(self.missing(jobs).items()):
            if self.out_of_time():
                break
            tag = f"records/eval{len(list((self.work / 'records').glob('*.json')))}"  # a new file per call: none is lost
            t = time.monotonic()
            sc.evaluate_arms(todo, self.args, self.data, self.work, self.device, self.slots, self.deadline - 5, self.log,
                             lengths=list(lengths), tag=tag)  # fmt: skip
            self._time("eval_s", time.monotonic() - t)
        left = sum(len(lengths) * len(todo) for lengths, todo in self.missing(jobs).items())
        if left and not self.out_of_time():
            raise StudyError(f"evaluation: {left} (model, mode, length) not measured; see the logs in {self.work}/records")
        if left:
            self.cut.append(f"evaluation: {left} (model, mode, length) not measured")

    def measure_cost(self, runs: list[Run]) -> None:
        """Xfull-s0 and Xseg-s0 again, each alone on the device for ``--cost-steps`` steps from the same start: training
        tokens/s (median of the logged steps after the first two) and peak memory, into work/cost/<name>.json."""
        import yaml

        if self.args.cost_steps <= 0:
            return
        (self.work / "cost").mkdir(exist_ok=True)
        for r in runs:
            name, out = r.arm.name, self.work / "cost" / f"{r.arm.name}.json"
            if name not in ("Xfull-s0", "Xseg-s0") or out.is_file() or self.out_of_time():
                continue
            run_dir = self.work / "cost" / name
            config = {**r.config, "steps": self.args.cost_steps, "log_every": 5, "save_every": self.args.cost_steps,
                      "out_dir": str(run_dir), "export_final": False}  # fmt: skip
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            spec = {"config": str(run_dir / "train.yaml"), "init_from": str(r.init_from), "output": str(out)}
            (run_dir / "job.json").write_text(json.dumps(spec))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--cost-worker", str(run_dir / "job.json")]
            self.log(f"cost: {name} alone for {self.args.cost_steps} steps")
            proc = sc._spawn(cmd, run_dir / "cost.log", sc._env(self.device, 0, os.cpu_count() or 1))
            sc._wait([proc], self.deadline - 5)
            sc._stop([proc], self.log)
            if not out.is_file():
                self.cut.append(f"cost: {name} not measured (see {run_dir / 'cost.log'})")

    def run(self) -> dict:
        args = self.args
        if not (self.data / "data.json").is_file():
            self.log(f"preparing data in {self.data} (carry a --prepare-data folder to skip this)")
        sc.prepare_data(self.data, args.corpus_bytes, args.vocab, args.heldout_fraction)
        args.vocab = json.loads((self.data / "data.json").read_text())["vocab"]
        phases = self.phases = plan(args, self.data, self.work, self.device)
        total = sum(expected_seconds(p, args) for p in phases.values())
        self.log(f"plan: {sum(len(p) for p in phases.values())} training runs, ~{total:.0f} s of training expected on "
                 f"{self.slots} {self.device} slot(s) (more on a CPU), then evaluation at {args.seq_length} and "
                 f"{2 * args.seq_length} tokens")  # fmt: skip
        if self.train("init", phases["init"]) and self.train("base", phases["base"]):
            self.calibrated = self.calibrate(phases["base"])
            phases = self.phases = plan(args, self.data, self.work, self.device, self.calibrated)
            if self.train("finetune", phases["finetune"]):
                self.measure_cost(phases["finetune"])
        else:
            self.cut.append("calibration and fine-tuning: not started")
        self.evaluate(self.eval_jobs(phases, self.calibrated))
        return self.results()

    def results(self) -> dict:
        import torch

        args, calibrated = self.args, self.calibrated
        phases = self.phases or plan(args, self.data, self.work, self.device)  # a signal before the plan was made
        from segtrain.config import ModelConfig
        from segtrain.models.llama import LlamaForCausalLM

        runs = [r for p in phases.values() for r in p]
        with torch.device("meta"):
            model_cfg = {**runs[0].config["model"], "segment_size": args.segment_size}
            n_params = LlamaForCausalLM(ModelConfig(**model_cfg)).num_parameters()
        device_name = torch.cuda.get_device_name(0) if self.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
        return {
            "study": {
                "finished": not self.cut,
                "cut": self.cut,
                "device": f"{self.slots} x {device_name}" if self.device == "cuda" else device_name,
                "timings": self.timings,
                "commands": [
                    *([f"python tools/study_consistency.py --prepare-data {args.data}  # on a CPU first"] if args.data else []),
                    shlex.join(["python", "tools/study_adapt.py", *(self.argv or [])]) + "  # rerun until it finishes",
                ],
                "model": model_cfg,
                "parameters": n_params,
                "precision": "bf16" if self.device == "cuda" else "fp32",
                **{k: getattr(args, k) for k in RECORDED_ARGS},
                "runs": {
                    r.arm.name: {
                        "segment_size": r.arm.segment_size,
                        "policy": r.arm.policy,
                        "seed": r.arm.seed,
                        "seq_length": r.config["data"]["seq_length"],
                        "micro_batch": r.config["micro_batch_size"],
                        "steps": r.config["steps"],
                        "lr": [r.config["optim"]["lr"], r.config["optim"]["min_lr"]],
                        "init_from": _relative(r.init_from, self.work),
                        "steps_done": sc._steps_done(self.work / r.arm.name),
                        "finished": (self.work / r.arm.name / "final").is_dir(),
                        "tokens_per_s": _median_tokens_per_s(self.work / r.arm.name),
                        "checkpoints": {str(k): v for k, v in r.checkpoints.items()},
                    }
                    for r in runs
                },
                "calibration": {k: {"all_heads": v["all_heads"], "seconds": v["seconds"]} for k, v in calibrated.items()},
                "cost": {p.stem: json.loads(p.read_text()) for p in sorted((self.work / "cost").glob("*.json"))},
                "loss_curves": sc.loss_curves([r.arm for r in runs], self.work),
            },
            "records": sorted(self.records(), key=_record_order),
        }


FAMILIES = ("A", "E", "Ecal", "B", "Xfull", "Xseg")


def _record_order(r: dict) -> tuple:
    """By length, then model, then mode: full, first-k, calibrated, the fine-tuning fractions in order, own."""
    family, _, seed = r["model"].partition("-")
    modes = {"full": -3.0, FIRST_K: -2.0, CALIBRATED: -1.0, "own": 2.0}
    mode = modes.get(r["mode"], float(r["mode"].rstrip("%")) / 100 if r["mode"].endswith("%") else 3.0)
    return r["length"], FAMILIES.index(family) if family in FAMILIES else len(FAMILIES), seed, mode


def run_cost_worker(job_file: str) -> int:
    """One training run alone (``segtrain train`` in this process), then its throughput and this process's peak memory."""
    import torch

    from segtrain.cli import main as segtrain_main

    spec = json.loads(Path(job_file).read_text())
    rc = segtrain_main(["train", "--config", spec["config"], "--init-from", spec["init_from"], "--no-progress", "--overwrite"])
    if rc:
        return rc
    run_dir = Path(spec["config"]).parent
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in x]
    rates = sorted(r["tokens_per_s"] for r in rows[2:] or rows)  # the first logged steps include compilation
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    result = {"tokens_per_s": rates[len(rates) // 2], "peak_memory_gib": peak / 2**30 if peak is not None else None,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"}  # fmt: skip
    Path(spec["output"]).write_text(json.dumps(result))
    return 0


def _relative(path: Path | None, work: Path) -> str | None:
    return None if path is None else str(path.relative_to(work) if path.is_relative_to(work) else path)


def _median_tokens_per_s(run_dir: Path) -> float | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rates = sorted(json.loads(x)["tokens_per_s"] for x in metrics.read_text().splitlines() if '"tokens_per_s"' in x)
    return rates[len(rates) // 2] if rates else None


# ---- report ---------------------------------------------------------------------------------------


def _acc(record: dict | None, buckets=("history",)) -> float | None:
    return sc._mean_accuracy(record, buckets) if record else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def recovery(results: dict, length: int, buckets=("history",)) -> list[tuple[str, float, list, list]]:
    """Rows (label, fraction of A's steps, E per seed, E-cal per seed): accuracy in ``buckets`` at ``length``."""
    s = results["study"]
    rec = {(r["model"], r["mode"]): r for r in results["records"] if r["length"] == length}
    seeds = range(s["seeds"])
    rows = [("0% (A segmented at inference)", 0.0, [_acc(rec.get((f"A-s{k}", FIRST_K)), buckets) for k in seeds],
             [_acc(rec.get((f"A-s{k}", CALIBRATED)), buckets) for k in seeds])]  # fmt: skip
    for f in s["fractions"]:
        label = f"{100 * f:g}%"
        rows.append((label, f, [_acc(rec.get((f"E-s{k}", label)), buckets) for k in seeds],
                     [_acc(rec.get((f"Ecal-s{k}", label)), buckets) for k in seeds]))  # fmt: skip
    return rows


def _reference(results: dict, length: int, model_prefix: str, mode: str, buckets=("history",)) -> list:
    return [
        _acc(r, buckets)
        for r in results["records"]
        if r["length"] == length and r["model"].split("-")[0] == model_prefix and r["mode"] == mode
    ]


def recovery_table(results: dict) -> list[str]:
    s = results["study"]
    T, steps = s["seq_length"], s["steps"]
    lines = [
        f"History-bucket accuracy (needles more than one segment back), mean over tasks; per seed in brackets. "
        f"Fine-tuning steps as a fraction of A's {steps}.",
        "",
        f"| fine-tune steps | E at T={T} | E-cal at T | E at 2T={2 * T} | E-cal at 2T |",
        "| --- | --- | --- | --- | --- |",
    ]
    at_t, at_2t = recovery(results, T), recovery(results, 2 * T)
    for (label, _, e, c), (_, _, e2, c2) in zip(at_t, at_2t):
        cells = [f"{_pct(_mean(x))} ({', '.join(_pct(v) for v in x)})" for x in (e, c, e2, c2)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name, prefix, mode in (("A full attention", "A", "full"), ("B segtrain from the init", "B", "own")):
        t, t2 = _reference(results, T, prefix, mode), _reference(results, 2 * T, prefix, mode)
        lines.append(f"| {name} (reference) | {_pct(_mean(t))} | | {_pct(_mean(t2))} | |")
    return lines


def extension_table(results: dict) -> list[str]:
    s = results["study"]
    T = s["seq_length"]
    short, ext = (s["runs"].get("As-s0") or {}).get("steps"), (s["runs"].get("Xfull-s0") or {}).get("steps")
    lines = [
        f"As: full attention at T/4={T // 4} for {short} steps ({4 * s['micro_batch']} sequences per step); then {ext} steps "
        f"at T={T} ({s['micro_batch']} sequences) with full attention (Xfull) or B's policy (Xseg): the same tokens as A. "
        "Accuracy per distance bucket, mean over tasks and seeds; tokens/s is the median of the logged steps while "
        "the fine-tuning phase's runs shared the device (time-sliced), so compare it between rows only.",
        "",
        "| arm | length | own | previous | history | all | tokens/s (training, shared) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for length in (T, 2 * T):
        for family, mode in (("Xfull", "full"), ("Xseg", "own"), ("E", f"{100 * max(s['fractions']):g}%"), ("A", "full")):
            recs = [r for r in results["records"] if r["length"] == length and r["model"].split("-")[0] == family
                    and r["mode"] == mode]  # fmt: skip
            if not recs:
                continue
            cells = [_pct(_mean([_acc(r, (b,)) for r in recs])) for b in ("own", "previous", "history")]
            cells.append(_pct(_mean([_acc(r, ("own", "previous", "history")) for r in recs])))
            rates = [v["tokens_per_s"] for k, v in s["runs"].items() if k.split("-")[0] == family and v["tokens_per_s"]]
            label = family if family.startswith("X") else f"{family} ({mode})"
            lines.append(f"| {label} | {length} | " + " | ".join(cells) + f" | {_mean(rates) or 0:,.0f} |")
    cost = s.get("cost") or {}
    if cost:
        lines += ["", "Each extension alone on the device (the same start, the same steps; peak: the training process's "
                  "allocated memory):", "", "| arm | tokens/s | peak memory | device |", "| --- | --- | --- | --- |"]  # fmt: skip
        for name, c in cost.items():
            peak = "-" if c.get("peak_memory_gib") is None else f"{c['peak_memory_gib']:.2f} GiB"
            lines.append(f"| {name} | {c['tokens_per_s']:,.0f} | {peak} | {c.get('device', '-')} |")
    return lines


def at_2t_lines(results: dict) -> list[str]:
    """Where an adapted model loses at 2T what B keeps: in the own/previous buckets (positions beyond the trained
    length) or in history only (what the history heads reach)."""
    s = results["study"]
    T2, last = 2 * s["seq_length"], f"{100 * max(s['fractions']):g}%"
    out = []
    for family, mode in (("E", last), ("Ecal", last)):
        e = {b: _mean([_acc(r, (b,)) for r in results["records"] if r["length"] == T2 and r["model"].split("-")[0] == family
                       and r["mode"] == mode]) for b in ("own", "previous", "history")}  # fmt: skip
        b_ref = {b: _mean(_reference(results, T2, "B", "own", (b,))) for b in ("own", "previous", "history")}
        if None in e.values() or None in b_ref.values():
            continue
        lost = [b for b in e if e[b] < b_ref[b] - 0.1]
        where = (
            "nothing (within 10 points of B in every bucket)"
            if not lost
            else "the near buckets too (own/previous): positions beyond the trained length, not the history heads' reach"
            if set(lost) & {"own", "previous"}
            else "the history bucket only: what the history heads reach, not positions"
        )
        out.append(f"- {family} at {mode} vs B at 2T={T2}: own {_pct(e['own'])} vs {_pct(b_ref['own'])}, previous "
                   f"{_pct(e['previous'])} vs {_pct(b_ref['previous'])}, history {_pct(e['history'])} vs "
                   f"{_pct(b_ref['history'])}; it loses {where}.")  # fmt: skip
    return out or ["- (B or the last E checkpoint was not measured at 2T.)"]


def render_doc(results: dict, regenerate: str = "python tools/study_adapt.py --report-from results.json") -> str:
    """The study's markdown; ``regenerate``: the command that writes it again from its JSON."""
    from segtrain.eval.report import markdown

    s = results["study"]
    status = (
        "**Complete:** every run trained its full step count and every evaluation was measured."
        if s["finished"]
        else "**NOT FINISHED (cut short by the deadline or a signal; rerun the command to continue):** " + "; ".join(s["cut"])
    )
    lines = [
        status,
        "",
        "# Adapting a pretrained full-attention model to segmented serving (small-scale study)",
        "",
        f"Generated by `tools/study_adapt.py` from its results (regenerate: `{regenerate}`).",
        "",
        "## Recovery curve",
        "",
        *recovery_table(results),
        "",
        "![recovery curve](adapt_recovery.png)",
        "",
        "## Extension: full attention vs segtrain from T/4 to T",
        "",
        *extension_table(results),
        "",
        "## Beyond the trained length (2T)",
        "",
        *at_2t_lines(results),
        "",
        "## Setup",
        "",
        f"- Device: {s['device']}; time per phase (summed over reruns): "
        + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in s["timings"].items())
        + ".",
        f"- Model: Llama, d={s['model']['hidden_size']}, {s['model']['num_layers']} layers, {s['model']['num_heads']} heads, "
        f"{s['model']['num_kv_heads']} KV heads, vocab {s['model']['vocab_size']}, {s['parameters'] / 1e6:.1f}M parameters, "
        f"{s['precision']}; T={s['seq_length']}, S={s['segment_size']}; B's policy: 25% of KV heads (the first of each "
        "layer) `all`, the rest `none`.",
        f"- Common init: {s['init_steps']} steps of {s['init_micro_batch']} x {s['init_length']} tokens (one segment). "
        f"A: {s['steps']} steps of {s['micro_batch']} x {s['seq_length']}, lr {s['lr']:g} cosine to lr/10. E / E-cal: "
        f"constant lr {s['ft_lr']:g} after {s['ft_warmup']} warmup steps, checkpoints at "
        + ", ".join(f"{100 * f:g}%" for f in s["fractions"])
        + " of A's steps. E-cal starts from A with the heads `segtrain calibrate` chose ("
        + f"{s['calibrate_steps']} steps, the same 25% budget). Data: the consistency study's blend "
        f"({100 * s['synthetic_fraction']:.0f}% synthetic {'/'.join(s['tasks'])}, options {json.dumps(s['task_options'])}).",
        "",
        "| run | length | segment | policy | seed | starts from | steps | done | lr (start, end) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in s["runs"].items():
        policy = r["policy"] if isinstance(r["policy"], str) else ("calibrated" if name.startswith("Ecal") else "B")
        lines.append(f"| {name} | {r['seq_length']} | {r['segment_size']} | {policy} | {r['seed']} | {r['init_from'] or '-'} | "
                     f"{r['steps']} | {r['steps_done']} | {r['lr'][0]:g}, {r['lr'][1]:g} |")  # fmt: skip
    lines += ["", "## Tables", "", markdown(results["records"]) if results["records"] else "(nothing measured)", ""]
    lines += ["## Commands", "", "```bash", *s["commands"], "```", ""]
    return "\n".join(lines)


def plot_recovery(results: dict, path: Path) -> None:
    from segtrain.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    s = results["study"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for length, style in ((s["seq_length"], "-"), (2 * s["seq_length"], "--")):
        rows = recovery(results, length)
        for i, name in ((2, "E (first-k heads)"), (3, "E-cal (calibrated heads)")):
            pts = [(100 * r[1], _mean(r[i])) for r in rows if _mean(r[i]) is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{name} at {length}")
        for prefix, mode, color in (("A", "full", "gray"), ("B", "own", "green")):
            ref = _mean(_reference(results, length, prefix, mode))
            if ref is not None:
                ax.axhline(ref, color=color, linestyle=style, alpha=0.5, label=f"{prefix} {mode} at {length}")
    ax.set(xlabel="fine-tuning steps (% of A's)", ylabel="history-bucket accuracy", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out: Path) -> None:
    from segtrain.checkpoint.atomic import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(out / "adapt.md", render_doc(results))
    plot_recovery(results, out / "recovery.png")
    sc.plot_losses(results["study"]["loss_curves"], out / "train_loss.png")


def report_from(json_path: str, doc: str) -> int:
    """Regenerate the doc (plots beside it as ``adapt_*.png``, the JSON as ``adapt.json``) from a results.json."""
    import shutil

    from segtrain.checkpoint.atomic import write_text_atomic

    results = json.loads(Path(json_path).read_text())
    doc_path = Path(doc)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    json_copy = doc_path.parent / "adapt.json"
    regenerate = f"python tools/study_adapt.py --report-from {json_copy} --doc {doc_path}"
    write_text_atomic(doc_path, render_doc(results, regenerate))
    plot_recovery(results, doc_path.parent / "adapt_recovery.png")
    sc.plot_losses(results["study"]["loss_curves"], doc_path.parent / "adapt_train_loss.png")
    if Path(json_path).resolve() != json_copy.resolve():
        shutil.copyfile(json_path, json_copy)
    print(f"wrote {doc_path}")
    return 0


def print_plan(args) -> int:
    work = Path(args.work)
    fake_calibration = {f"A-s{s}": {"policy": "calibrated", "path": str(work / f"A-s{s}-calibrated")} for s in range(args.seeds)}
    phases = plan(args, Path(args.data or work / "data"), work, "cuda", fake_calibration)
    for phase, runs in phases.items():
        print(f"{phase}: ~{expected_seconds(runs, args):.0f} s of training at {EXPECTED_ARM_STEPS_PER_S:.0f} arm-steps/s per GPU")
        for r in runs:
            c = r.config
            print(f"  {r.arm.name}: {c['steps']} steps of {c['micro_batch_size']} x {c['data']['seq_length']} tokens, "
                  f"segment {r.arm.segment_size}, from {_relative(r.init_from, work) or 'random'}")  # fmt: skip
    total = sum(expected_seconds(p, args) for p in phases.values())
    print(f"total training ~{total:.0f} s; then calibration ({args.calibrate_steps} steps per A) and evaluation at "
          f"{args.seq_length} and {2 * args.seq_length} tokens")  # fmt: skip
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report_from:
        return report_from(args.report_from, args.doc)
    if args.cost_worker:
        return run_cost_worker(args.cost_worker)
    if getattr(args, "eval_worker", None):
        return sc.run_eval_worker(args.eval_worker)
    if getattr(args, "prepare_data", None):
        return sc.main(argv)

    main_pid = os.getpid()

    def interrupted(signum, frame):
        if os.getpid() == main_pid:  # not in a forked helper (the data preparation's pool)
            raise Interrupted(signal.Signals(signum).name)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    if args.plan:
        return print_plan(args)
    study = Study(args, argv)
    try:
        results = study.run()
    except Interrupted as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        study.log(f"{e}: stopping (the runs checkpoint as they stop)")
        sc._stop([p for p in sc.SPAWNED if p.poll() is None], study.log)
        study.cut.append(f"stopped by {e}")
        results = study.results()
    except StudyError as e:
        print(f"study_adapt: error: {e}", file=sys.stderr)
        return 1
    write_outputs(results, study.out)
    if results["study"]["finished"]:
        study.log(f"done: {', '.join(OUTPUT_FILES)} in {study.out}")
        print(render_doc(results))
    else:
        study.log("not finished, rerun to continue: " + "; ".join(results["study"]["cut"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
