"""``segtrain train --config configs/train/<name>.yaml``."""

from __future__ import annotations

import sys

import yaml


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="a training YAML (configs/train/*.yaml)")
    p.add_argument(
        "--resume",
        default="none",
        help="'auto': the latest checkpoint in out_dir, if any; 'none'; or a checkpoint dir",
    )
    p.add_argument("--stop-at", type=int, help="stop (with a checkpoint) after this step; the schedule still runs to `steps`")
    p.add_argument("--init-from", help="start from a portable model directory (config.json + model.safetensors)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field with a YAML value, e.g. --set steps=10 --set optim.lr=1e-3",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(args) -> int:
    from segtrain.config import ConfigError
    from segtrain.parallel.groups import LayoutError
    from segtrain.policy import PolicyError
    from segtrain.train.config import load_train_config
    from segtrain.train.loop import train

    try:
        cfg = load_train_config(args.config, parse_overrides(args.set))
        summary = train(cfg, resume=args.resume, init_from=args.init_from, stop_at=args.stop_at, progress=not args.no_progress)
    except (ConfigError, LayoutError, PolicyError) as e:
        print(f"segtrain train: error: {e}", file=sys.stderr)
        return 2
    if summary["losses"]:
        print(f"trained to step {summary['step']}: loss {summary['losses'][0]:.4f} -> {summary['losses'][-1]:.4f}")
    return 0
