"""A model directory in, a calibrated model directory out: data, the learning loop, resumption, the written result.

The output is the input model (architecture and weights copied bit for bit from the source files)
with ``history_policy`` set to the explicit per-layer table the gates chose (``PolicyTable.to_spec()``)
and the calibration's segment size, plus ``calibration.json`` (gates, budget, bounded policy, timing,
the distillation loss of every step) and, when matplotlib is installed, ``calibration.png``. While
learning, ``OUT/calibrate_state.json`` (gates and Adam state, written atomically every
``save_every`` steps and on SIGINT/SIGTERM) lets a rerun with the same options continue; ``OUT`` appears
with that state in it, and the finished directory replaces it whole. Batch ``i`` is always the same
synthetic samples, so a resumed run learns the same gates. Left out, ``--seq-length`` and ``--bounded``
fit the model (:func:`~segtrain.calibrate.options.fitted`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from segtrain.calibrate.options import CalibrationError, CalibrationOptions, check_options, fitted
from segtrain.calibrate.stop import CalibrationStopped, StopSignals, ignore_in_worker
from segtrain.checkpoint.calibration import (
    CALIBRATION_FILE,
    FORMAT,
    FORMAT_VERSION,
    budget_edge,
    calibrated_table,
)
from segtrain.plotting import pyplot
from segtrain.userfiles import existing_path, read_json

DEFAULT_OPTIONS = CalibrationOptions()

__all__ = [
    "CalibrationError",
    "CalibrationOptions",
    "STATE_FILE",
    "calibrate_dir",
    "device_and_dtype",
    "format_gates",
    "load_model_tokenizer",
    "plot_gates",
]

STATE_FILE = "calibrate_state.json"
PLOT_FILE = "calibration.png"
EDGE_GAP = 0.01  # chosen and passed-over gates closer than this: the budget's edge is not decided by the gates
PROBED = 64  # samples whose length the default --seq-length covers (with room to spare: later ones vary a little)


# ---- the source model -----------------------------------------------------------------------------


def _open_source(src: Path, segment_size: int | None):
    """The source (:func:`~segtrain.checkpoint.open.open_model`: config, weights checked by name and shape,
    tokenizer); errors name ``--model``."""
    from segtrain.checkpoint.open import open_model
    from segtrain.errors import UserError

    existing_path(src, "--model", kind="dir", error=CalibrationError)
    try:
        return open_model(src, segment_size=segment_size)
    except (UserError, FileNotFoundError) as e:  # a wrong source, config or policy: one line naming the flag
        raise CalibrationError(f"--model: {str(e).removeprefix('model: ')}") from None


def load_model_tokenizer(src, tokenizer: str | os.PathLike | None, vocab_size: int):
    """``--tokenizer``, else the source's (:class:`~segtrain.checkpoint.open.ModelSource`, or a path to open) own
    tokenizer, else the one its training run names; checked to fit ``vocab_size``."""
    from segtrain.data.tokenizer import TokenizerError

    source = src if not isinstance(src, (str, os.PathLike)) else _open_source(Path(src), None)
    try:
        tok = source.load_tokenizer(tokenizer)
    except TokenizerError as e:
        raise CalibrationError(f"--tokenizer: {str(e).removeprefix('--tokenizer: ')}") from None
    if tok is None:
        raise CalibrationError(f"--tokenizer: {source.path} has no tokenizer and no training run names one; pass --tokenizer")
    size = getattr(tok, "vocab_size", None)
    if isinstance(size, int) and size > vocab_size:
        raise CalibrationError(f"--tokenizer: {tokenizer or source.tokenizer} has {size} pieces, more than the model's "
                               f"vocab_size {vocab_size}")  # fmt: skip
    return tok


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device`` / ``--dtype``: auto is cuda if available, and bfloat16 there, float32 on the CPU."""
    from segtrain.checkpoint.open import torch_dtype

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    try:
        chosen = torch_dtype(dtype)
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    return dev, chosen or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


# ---- the output directory -------------------------------------------------------------------------


def _resume_state(out: Path, learning: dict, overwrite: bool) -> dict | None:
    """The saved state to continue from (None: start afresh); a finished or foreign ``out`` needs ``overwrite``."""
    state_file = out / STATE_FILE
    if overwrite or not out.exists():
        return None
    if state_file.is_file():
        state = read_json(state_file, error=CalibrationError)
        differ = [k for k in learning if state["learning"].get(k) != learning[k]]
        if differ:
            k = differ[0]
            raise CalibrationError(
                f"--out: {out} holds a calibration with {k}={state['learning'].get(k)!r} (now {learning[k]!r}); "
                f"pass --overwrite to start over"
            )
        return state
    if any(out.iterdir()):
        raise CalibrationError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
    return None


def _write_output(out: Path, source, record: dict, tokenizer) -> None:
    from segtrain.checkpoint.atomic import staged_dir
    from segtrain.checkpoint.portable import write_portable
    from segtrain.config import ModelConfig, from_dict
    from segtrain.data.tokenizer import MODEL_FILE, copy_tokenizer

    calibrated = from_dict(ModelConfig, {**source.config.to_dict(), "history_policy": record["policy"]}, "model")
    with staged_dir(out) as tmp:
        write_portable(tmp, calibrated, source.names, source.weights.shapes, source.dtype, source.weights.__getitem__)
        copy_tokenizer(source.path, tmp)
        if not (tmp / MODEL_FILE).is_file() and hasattr(tokenizer, "save"):
            tokenizer.save(tmp)  # the run's tokenizer travels with the model
        (tmp / CALIBRATION_FILE).write_text(record_json(record))
        plot_gates(record, tmp / PLOT_FILE)


def record_json(record: dict) -> str:
    """``record`` as JSON, one key per line, the (layer x head) tables one layer per line."""

    def value(key: str, v) -> str:
        if key in ("gates", "policy"):
            return "[\n" + ",\n".join(f"  {json.dumps(row)}" for row in v) + "\n ]"
        return json.dumps(v)

    return "{\n" + ",\n".join(f" {json.dumps(k)}: {value(k, v)}" for k, v in record.items()) + "\n}\n"


def format_gates(record: dict) -> str:
    """The gates as a text table, layers down, KV heads across; ``*`` marks the heads that read all history."""
    lines = ["layer " + " ".join(f"{'kv' + str(h):>7}" for h in range(len(record["gates"][0])))]
    for layer, (row, chosen) in enumerate(zip(record["gates"], record["policy"])):
        lines.append(f"{layer:5d} " + " ".join(f"{g:6.3f}{'*' if p == 'all' else ' '}" for g, p in zip(row, chosen)))
    edge = budget_edge(record["gates"], record["budget"])
    if edge is not None and edge[0] - edge[1] < EDGE_GAP:
        lines.append(
            f"warning: the last chosen gate ({edge[0]:.3f}) and the first passed over ({edge[1]:.3f}) differ by less "
            f"than {EDGE_GAP}: the gates do not decide the budget's last heads; with gates near 1 raise --l1, near 0 "
            "lower it, or run more --steps"
        )
    return "\n".join(lines)


def plot_gates(record: dict, file: Path) -> bool:
    """A heat map of the gates (chosen heads marked) as ``file``; False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    gates = record["gates"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(gates[0]), 1.2 + 0.3 * len(gates)))
    image = ax.imshow(gates, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for layer, row in enumerate(record["policy"]):
        for head, policy in enumerate(row):
            if policy == "all":
                ax.text(head, layer, "*", ha="center", va="center", color="red")
    ax.set(xlabel="KV head", ylabel="layer", title=f"gates (* = all; rest {record['bounded']}; budget {record['budget']})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)
    return True


# ---- the job --------------------------------------------------------------------------------------


def calibrate_dir(
    model: str | os.PathLike,
    out: str | os.PathLike,
    options: CalibrationOptions = DEFAULT_OPTIONS,
    *,
    tokenizer: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    workers: int = 2,
    save_every: int = 50,
    stop_at: int | None = None,
    activation_checkpointing: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict | None:
    """Calibrate the model in ``model`` (portable or HF Llama directory) and write ``out``; returns the
    calibration record, or None when ``stop_at`` stopped it early (its state saved in ``out``).

    SIGINT or SIGTERM raises :class:`~segtrain.calibrate.stop.CalibrationStopped`: during learning after the
    step in progress, with the state saved; before it at once, with nothing written."""
    with StopSignals() as stop:
        return _calibrate(model, out, options, stop, tokenizer=tokenizer, device=device, dtype=dtype, workers=workers,
                          save_every=save_every, stop_at=stop_at, activation_checkpointing=activation_checkpointing,
                          overwrite=overwrite, progress=progress)  # fmt: skip


def _longest_sample(options: CalibrationOptions, tok) -> int:
    """The most tokens any of the first :data:`PROBED` samples needs (its parts without filler)."""
    from segtrain.data.synthetic import PartEncoder, SyntheticError, needed_length

    enc, tasks = PartEncoder(tok), options.tasks
    try:
        return max(needed_length(tasks[i % len(tasks)], enc, seed=options.seed, index=i,
                                 **options.task_options.get(tasks[i % len(tasks)], {})) for i in range(PROBED))  # fmt: skip
    except SyntheticError as e:
        raise CalibrationError(f"--task-options: {e}") from None


def _calibrate(
    model: str | os.PathLike, out: str | os.PathLike, options: CalibrationOptions, stop: StopSignals, *,
    tokenizer: str | os.PathLike | None, device: str, dtype: str, workers: int, save_every: int, stop_at: int | None,
    activation_checkpointing: bool, overwrite: bool, progress: bool,
) -> dict | None:  # fmt: skip
    """:func:`calibrate_dir`'s work, under its signal handlers."""
    from segtrain.calibrate.learner import GateLearner

    src, out = Path(model), Path(out)
    source = _open_source(src, options.segment_size)
    config = source.config
    check_options(options, config.segment_size)
    if save_every < 1:
        raise CalibrationError(f"--save-every: must be a positive integer, got {save_every!r}")
    tok = load_model_tokenizer(source, tokenizer, config.vocab_size)
    needed = _longest_sample(options, tok) + 1 if options.seq_length is None else 0
    options = fitted(options, config.segment_size, config.max_position_embeddings, needed)
    check_options(options, config.segment_size)
    dev, dt = device_and_dtype(device, dtype)
    learning = options.learning(os.fspath(src.resolve()), config.segment_size)
    state = _resume_state(out, learning, overwrite)
    data = _dataset(options, tok)

    net = source.build(device=dev, dtype=dt)
    if activation_checkpointing:
        from segtrain.speed.portable import ActivationOptions, parallelize_portable

        parallelize_portable(net, activation=ActivationOptions(checkpointing=True))
    learner = GateLearner(net, options.bounded, lr=options.lr, l1=options.l1)
    run = _Run(out, learning, learner)
    if state is not None:
        run.resume(state)
    end = options.steps if stop_at is None else min(options.steps, stop_at)
    if progress and run.step < end:
        print(f"segtrain calibrate: {config.num_layers} layers x {config.num_kv_heads} KV heads; {options.seq_length} tokens "
              f"per sample (segments of {config.segment_size}); bounded heads {options.bounded}; steps {run.step + 1}-{end} "
              f"of {options.steps}", file=sys.stderr, flush=True)  # fmt: skip
    run.learn(data, end, options, stop, dev, workers=workers, save_every=save_every, progress=progress)
    if end < options.steps:
        return None
    record = _record(run, options, src, config.segment_size, dev, dt)
    if not math.isfinite(sum(run.distill)):
        raise CalibrationError("--lr: the distillation loss is not finite; lower --lr or check the model")
    _write_output(out, source, record, tok)
    return record


def _dataset(options: CalibrationOptions, tok):
    """The synthetic samples of every step (sample ``i`` is always the same); errors name the flag."""
    from segtrain.data.synthetic import SyntheticDataset, SyntheticError

    try:
        return SyntheticDataset(
            list(options.tasks), tok, options.seq_length, options.steps * options.batch_size, seed=options.seed,
            **{t: dict(o) for t, o in options.task_options.items()},
        )  # fmt: skip
    except SyntheticError as e:
        if str(e).startswith("seq_length"):
            raise CalibrationError(f"--seq-length: too short for the tasks: {str(e).removeprefix('seq_length: ')}") from None
        raise CalibrationError(f"--task-options: {e}") from None


class _Run:
    """The learning in progress: gates and optimizer (the learner), steps done, time spent, the loss of each step;
    saved as ``OUT/calibrate_state.json``."""

    def __init__(self, out: Path, learning: dict, learner):
        self.out, self.learning, self.learner = out, learning, learner
        self.step, self.seconds, self.distill, self.first_step = 0, 0.0, [], None
        self.saved_step = None  # an old state (starting over with --overwrite) stays until the first save replaces it

    def resume(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        self.step, self.seconds, self.distill = state["step"], state["seconds"], state["distill"]
        self.first_step = state["first_step_seconds"]

    def save(self) -> None:
        from segtrain.checkpoint.atomic import staged_dir, write_text_atomic

        saved = {"learning": self.learning, "step": self.step, "seconds": self.seconds, "first_step_seconds": self.first_step,
                 "distill": self.distill, "learner": self.learner.state_dict()}  # fmt: skip
        if self.out.is_dir():
            write_text_atomic(self.out / STATE_FILE, json.dumps(saved))
        else:  # --out appears with its state in it, never empty
            with staged_dir(self.out) as tmp:
                (tmp / STATE_FILE).write_text(json.dumps(saved))
        self.saved_step = self.step

    def learn(self, data, end: int, options: CalibrationOptions, stop: StopSignals, dev: torch.device, *, workers: int,
              save_every: int, progress: bool) -> None:  # fmt: skip
        """Steps up to ``end``, saving every ``save_every`` steps, at ``end`` and on a signal (then raising
        :class:`CalibrationStopped` with the step saved)."""
        from torch.utils.data import DataLoader

        from segtrain.progress import show_progress

        B, start = options.batch_size, self.step
        loader = DataLoader(data, batch_size=B, sampler=range(start * B, end * B), num_workers=workers if end > start else 0,
                            worker_init_fn=ignore_in_worker)  # fmt: skip
        bar = show_progress(total=options.steps, initial=start, desc="calibrate", enabled=progress)
        t0 = time.perf_counter()
        try:
            with stop.deferred():
                for step, batch in zip(range(start, end), loader):
                    t_step = time.perf_counter()
                    stats = self.learner.step(batch["tokens"].to(dev), batch["loss_mask"].to(dev) > 0)
                    if step == 0:
                        self.first_step = round(time.perf_counter() - t_step, 3)  # with compilation on a GPU
                    self.distill.append(stats["distill"])
                    self.step = step + 1
                    bar.set_postfix(distill=f"{stats['distill']:.3g}", gate=f"{stats['mean_gate']:.3f}")
                    bar.update(1)
                    if self.step % save_every == 0 or self.step == end or stop.signum is not None:
                        self.seconds, t0 = self.seconds + time.perf_counter() - t0, time.perf_counter()
                        self.save()
                    if stop.signum is not None:
                        raise CalibrationStopped(stop.signum)
        except CalibrationStopped as e:
            e.saved_step = self.saved_step
            raise
        finally:
            bar.close()


def _record(run: _Run, options: CalibrationOptions, src: Path, segment_size: int, dev, dt) -> dict:
    """What ``calibration.json`` says: the gates, the policy table they give, the options, timing and losses."""
    gates = run.learner.gates.tolist()
    table = calibrated_table(gates, options.budget, options.bounded)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": os.fspath(src),
        "gates": gates,
        "budget": options.budget,
        "bounded": str(run.learner.bounded),
        "policy": table.to_spec(),
        "all_heads": [[i, h] for i, row in enumerate(table.layers) for h, p in enumerate(row) if p.all],
        "budget_edge": budget_edge(gates, options.budget),  # last chosen, first passed-over gate
        **{k: v for k, v in asdict(options).items() if k not in ("budget", "bounded")},
        "tasks": list(options.tasks),
        "segment_size": segment_size,
        "device": str(dev),
        "dtype": str(dt).removeprefix("torch."),
        "seconds": round(run.seconds, 3),
        "seconds_per_step": round(run.seconds / max(1, len(run.distill)), 4),
        "first_step_seconds": run.first_step,
        "distill": [float(f"{d:.6g}") for d in run.distill],
    }
