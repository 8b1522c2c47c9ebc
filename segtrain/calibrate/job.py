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
import shutil
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
from segtrain.policy import PolicyError
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ---- the source model -----------------------------------------------------------------------------


def _source_weights(src: Path, config):
    """The source's tensors (lazily read), their names in table order, and the dtype they are stored in."""
    from segtrain.checkpoint import hf
    from segtrain.checkpoint.portable import open_portable

    state = hf.open_hf_weights(src) if hf.is_hf_dir(src) else open_portable(src)[1]
    names = hf.check_tensors(config, state.shapes, os.fspath(src))
    return state, names, state.dtypes.get(names[0]) or torch.float32


def _check_model(src: Path, segment_size: int | None):
    """The source's config, checked to have weights; errors name ``--model``."""
    from segtrain.checkpoint import ConversionError, load_config
    from segtrain.config import ConfigError

    existing_path(src, "--model", kind="dir", error=CalibrationError)
    try:
        config = load_config(src, segment_size=segment_size)
        _source_weights(src, config)
    except (ConfigError, ConversionError, FileNotFoundError, PolicyError) as e:
        raise CalibrationError(f"--model: {str(e).removeprefix('model: ')}") from None
    return config


def load_model_tokenizer(src: Path, tokenizer: str | os.PathLike | None, vocab_size: int):
    """``--tokenizer``, else the model directory's, else the one its training run names."""
    from segtrain.checkpoint.run import run_tokenizer
    from segtrain.data.tokenizer import TokenizerError, load_tokenizer

    if tokenizer is not None:
        existing_path(tokenizer, "--tokenizer", error=CalibrationError)
    where = tokenizer or src
    if tokenizer is None and not any((src / f).is_file() for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")):
        where = run_tokenizer(src.parent / "checkpoints")
        if where is None:
            raise CalibrationError(f"--tokenizer: {src} has no tokenizer and no training run names one; pass --tokenizer")
    try:
        tok = load_tokenizer(where)
    except TokenizerError as e:
        raise CalibrationError(f"--tokenizer: {e}") from None
    size = getattr(tok, "vocab_size", None)
    if isinstance(size, int) and size > vocab_size:
        raise CalibrationError(f"--tokenizer: {where} has {size} pieces, more than the model's vocab_size {vocab_size}")
    return tok


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device`` / ``--dtype``: auto is cuda if available, and bfloat16 there, float32 on the CPU."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CalibrationError(f"--dtype: expected auto or one of {list(DTYPES)}, got {dtype!r}")
    return dev, DTYPES[dtype]


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


def _write_output(out: Path, src: Path, config, record: dict, tokenizer) -> None:
    from segtrain.checkpoint.atomic import staged_dir
    from segtrain.checkpoint.portable import write_portable
    from segtrain.config import ModelConfig, from_dict

    calibrated = from_dict(ModelConfig, {**config.to_dict(), "history_policy": record["policy"]}, "model")
    state, names, dtype = _source_weights(src, config)
    with staged_dir(out) as tmp:
        write_portable(tmp, calibrated, names, state.shapes, dtype, state.__getitem__)
        for file in [*src.glob("tokenizer*"), src / "special_tokens_map.json"]:
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
        if not (tmp / "tokenizer.model").is_file() and hasattr(tokenizer, "save"):
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    from torch.utils.data import DataLoader

    from segtrain.calibrate.learner import GateLearner
    from segtrain.checkpoint import load_pretrained
    from segtrain.checkpoint.atomic import staged_dir, write_text_atomic
    from segtrain.data.synthetic import SyntheticDataset, SyntheticError
    from segtrain.progress import show_progress

    src, out = Path(model), Path(out)
    config = _check_model(src, options.segment_size)
    check_options(options, config.segment_size)
    if save_every < 1:
        raise CalibrationError(f"--save-every: must be a positive integer, got {save_every!r}")
    tok = load_model_tokenizer(src, tokenizer, config.vocab_size)
    needed = _longest_sample(options, tok) + 1 if options.seq_length is None else 0
    options = fitted(options, config.segment_size, config.max_position_embeddings, needed)
    check_options(options, config.segment_size)
    dev, dt = device_and_dtype(device, dtype)
    learning = options.learning(os.fspath(src.resolve()), config.segment_size)
    state = _resume_state(out, learning, overwrite)
    try:
        data = SyntheticDataset(
            list(options.tasks), tok, options.seq_length, options.steps * options.batch_size, seed=options.seed,
            **{t: dict(o) for t, o in options.task_options.items()},
        )  # fmt: skip
    except SyntheticError as e:
        if str(e).startswith("seq_length"):
            raise CalibrationError(f"--seq-length: too short for the tasks: {str(e).removeprefix('seq_length: ')}") from None
        raise CalibrationError(f"--task-options: {e}") from None

    net = load_pretrained(src, device=dev, dtype=dt, segment_size=options.segment_size)
    if activation_checkpointing:
        from segtrain.speed.portable import ActivationOptions, parallelize_portable

        parallelize_portable(net, activation=ActivationOptions(checkpointing=True))
    learner = GateLearner(net, options.bounded, lr=options.lr, l1=options.l1)
    start, seconds, distill, first_step = 0, 0.0, [], None
    if state is not None:
        learner.load_state_dict(state["learner"])
        start, seconds, distill, first_step = state["step"], state["seconds"], state["distill"], state["first_step_seconds"]
    saved_step = None  # an old state (starting over with --overwrite) stays until the first save replaces it

    def save(step: int) -> None:
        nonlocal saved_step
        saved = {"learning": learning, "step": step, "seconds": seconds, "first_step_seconds": first_step, "distill": distill,
                 "learner": learner.state_dict()}  # fmt: skip
        if out.is_dir():
            write_text_atomic(out / STATE_FILE, json.dumps(saved))
        else:  # --out appears with its state in it, never empty
            with staged_dir(out) as tmp:
                (tmp / STATE_FILE).write_text(json.dumps(saved))
        saved_step = step

    end = options.steps if stop_at is None else min(options.steps, stop_at)
    B = options.batch_size
    loader = DataLoader(data, batch_size=B, sampler=range(start * B, end * B), num_workers=workers if end > start else 0,
                        worker_init_fn=ignore_in_worker)  # fmt: skip
    if progress and end > start:
        print(f"segtrain calibrate: {config.num_layers} layers x {config.num_kv_heads} KV heads; {options.seq_length} tokens "
              f"per sample (segments of {config.segment_size}); bounded heads {options.bounded}; steps {start + 1}-{end} "
              f"of {options.steps}", file=sys.stderr, flush=True)  # fmt: skip
    bar = show_progress(total=options.steps, initial=start, desc="calibrate", enabled=progress)
    t0 = time.perf_counter()
    try:
        with stop.deferred():
            for step, batch in zip(range(start, end), loader):
                t_step = time.perf_counter()
                stats = learner.step(batch["tokens"].to(dev), batch["loss_mask"].to(dev) > 0)
                if step == 0:
                    first_step = round(time.perf_counter() - t_step, 3)  # with compilation on a GPU
                distill.append(stats["distill"])
                bar.set_postfix(distill=f"{stats['distill']:.3g}", gate=f"{stats['mean_gate']:.3f}")
                bar.update(1)
                if (step + 1) % save_every == 0 or step + 1 == end or stop.signum is not None:
                    seconds, t0 = seconds + time.perf_counter() - t0, time.perf_counter()
                    save(step + 1)
                if stop.signum is not None:
                    raise CalibrationStopped(stop.signum)
    except CalibrationStopped as e:
        e.step = saved_step
        raise
    finally:
        bar.close()
    if end < options.steps:
        return None

    gates = learner.gates.tolist()
    table = calibrated_table(gates, options.budget, options.bounded)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": os.fspath(src),
        "gates": gates,
        "budget": options.budget,
        "bounded": str(learner.bounded),
        "policy": table.to_spec(),
        "all_heads": [[i, h] for i, row in enumerate(table.layers) for h, p in enumerate(row) if p.all],
        "budget_edge": budget_edge(gates, options.budget),  # last chosen, first passed-over gate
        **{k: v for k, v in asdict(options).items() if k not in ("budget", "bounded")},
        "tasks": list(options.tasks),
        "segment_size": config.segment_size,
        "device": str(dev),
        "dtype": str(dt).removeprefix("torch."),
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(1, len(distill)), 4),
        "first_step_seconds": first_step,
        "distill": [float(f"{d:.6g}") for d in distill],
    }
    if not math.isfinite(sum(distill)):
        raise CalibrationError("--lr: the distillation loss is not finite; lower --lr or check the model")
    _write_output(out, src, config, record, tok)
    return record
