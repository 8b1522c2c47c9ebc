"""``segtrain train --config configs/train/<name>.yaml``."""

from __future__ import annotations

import os
import signal
import sys

from segtrain.errors import UserError


class ArgumentError(UserError):
    """A ``segtrain train`` flag that cannot be used; the message starts with the flag."""


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="a training YAML (configs/train/*.yaml)")
    p.add_argument(
        "--resume",
        default="none",
        help="'none' (default: a new run; out_dir must not hold another run), 'auto' (this out_dir's newest complete "
        "checkpoint, if any), a step number (20 or step_00000020) or a checkpoint folder",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the run already in out_dir (checkpoints, metrics, final)")
    p.add_argument("--stop-at", type=int, help="stop (with a checkpoint) after this step; the schedule still runs to `steps`")
    p.add_argument("--init-from", help="start from a portable model directory (config.json + model.safetensors)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field with a YAML value, e.g. --set steps=10 --set optim.lr=1e-3 --set model.segment_size=64",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the config, the layout for WORLD_SIZE processes and out_dir, then exit (launch/train.sh runs it first)",
    )


def parse_overrides(pairs: list[str]) -> dict:
    from segtrain.config import load_yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ArgumentError(f"--set: expected KEY=VALUE (e.g. --set steps=100), got {pair!r}")
        out[key.strip()] = load_yaml(value, f"--set {key.strip()}")
    return out


def _check(cfg, args) -> None:
    """What ``train`` would refuse, without joining a process group: the layout, the data and the run folder."""
    from segtrain.checkpoint.run import plan_start
    from segtrain.parallel.groups import make_layout
    from segtrain.train.data import check_data
    from segtrain.train.recipes import recipe_for

    layout = make_layout(int(os.environ.get("WORLD_SIZE", "1")), cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp)
    recipe_for(cfg).check(cfg, layout)
    check_data(cfg, cfg.micro_batch_size * cfg.grad_accum * layout.dp)
    if args.init_from is not None:
        from segtrain.train.loop import check_init_from

        check_init_from(args.init_from, cfg)
    plan_start(cfg.out_dir, args.resume, cfg.to_dict(), overwrite=args.overwrite)  # its notes: the run prints them


def run(args) -> int:
    """The stop signals are handled from here on: the imports and the startup take seconds (:mod:`segtrain.train.signals`)."""
    from segtrain.train.signals import StoppedDuringStartup, StopRequest, exit_status

    rank0 = os.environ.get("RANK", "0") == "0"
    with StopRequest(announce=rank0, starting=True) as stop:
        try:
            return _run(args, stop, rank0)
        except StoppedDuringStartup as e:
            if rank0:
                print(f"segtrain train: stopped by {e.name} during startup, before the first step: nothing was saved",
                      file=sys.stderr, flush=True)  # fmt: skip
            return exit_status(e.signum)


def _run(args, stop, rank0: bool) -> int:
    from segtrain.train.config import load_train_config
    from segtrain.train.signals import exit_status

    if args.stop_at is not None and args.stop_at < 1:
        raise ArgumentError(f"--stop-at: must be a positive step number, got {args.stop_at}")
    cfg = load_train_config(args.config, parse_overrides(args.set))
    if args.check:
        _check(cfg, args)
        print(f"segtrain train: {args.config}: ok")
        return 0
    from segtrain.train.loop import train

    summary = train(
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        init_from=args.init_from,
        stop_at=args.stop_at,
        progress=not args.no_progress,
        stop=stop,
    )
    if summary["stopped_by"] is not None:
        if rank0:
            print(
                f"segtrain train: stopped by {summary['stopped_by']} after step {summary['step']}; checkpoint "
                f"{summary['checkpoint']}; continue with: segtrain train --config {args.config}"
                + "".join(f" --set {pair}" for pair in args.set)
                + " --resume auto",
                file=sys.stderr,
            )
        name = summary["stopped_by"]
        return exit_status(getattr(signal, name) if name in signal.Signals.__members__ else signal.SIGTERM)
    if summary["losses"] and rank0:
        print(f"trained to step {summary['step']}: loss {summary['losses'][0]:.4f} -> {summary['losses'][-1]:.4f}")
    return 0
