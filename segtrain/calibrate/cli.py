"""``segtrain calibrate --model DIR --out DIR2 [--budget 0.25] [--bounded 'sink:64+window:1024']``.

SIGINT or SIGTERM: the step in progress finishes and the state is saved (rerun to continue), or, before learning
starts, nothing is written; the exit status is the shell's for the signal (130, 143)."""

from __future__ import annotations

import sys

from segtrain.calibrate.options import CalibrationOptions
from segtrain.checkpoint.open import DTYPES, SOURCES

DEFAULTS = CalibrationOptions()


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help=f"the model (its weights stay frozen): {SOURCES}")
    p.add_argument(
        "--out", required=True, help="the calibrated model dir to write (also holds the resumable state while running)"
    )
    p.add_argument("--budget", type=float, default=DEFAULTS.budget,
                   help="fraction of (layer, KV head) pairs that read all history, in (0, 1] (default %(default)s)")  # fmt: skip
    p.add_argument("--bounded", help="policy of the other heads: none, sink:N, window:W or sink:N+window:W (default: "
                   "sink:64+window:1024, each at most a quarter and a half of a segment)")  # fmt: skip
    p.add_argument(
        "--seq-length",
        type=int,
        help="tokens per synthetic sample (default: 4 segments of the model, more if the tasks need more)",
    )
    p.add_argument("--segment-size", type=int, help="segment size to calibrate and write (default: the model's)")
    p.add_argument("--tasks", default=",".join(DEFAULTS.tasks),
                   help="synthetic retrieval tasks, comma-separated; sample i is task i mod n (default %(default)s)")  # fmt: skip
    p.add_argument("--task-options", default="{}",
                   help='JSON options per task, as data.synthetic_options, e.g. \'{"passkey": {"digits": 2}}\'')  # fmt: skip
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="optimizer steps, one batch each (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="samples per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam learning rate of the gates (default %(default)s)")
    p.add_argument("--l1", type=float, default=DEFAULTS.l1, help="weight of the mean-gate penalty (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="synthetic data seed (default %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer for the synthetic data (default: the model dir's, else its training run's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--workers", type=int, default=2, help="data loader processes building samples (default %(default)s)")
    p.add_argument("--save-every", type=int, default=50, help="write the resumable state every N steps (default %(default)s)")
    p.add_argument("--stop-at", type=int, help="stop after this step with the state saved; rerun to continue")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in backward (big models)")
    p.add_argument("--overwrite", action="store_true", help="start over, replacing --out when done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (or lines, when stderr is not a terminal)")


def run(args) -> int:
    from segtrain.calibrate.job import calibrate_dir, format_gates
    from segtrain.calibrate.options import CalibrationError
    from segtrain.calibrate.stop import CalibrationStopped
    from segtrain.data.synthetic import SyntheticError, parse_task_options

    try:
        task_options = parse_task_options(args.task_options)
    except SyntheticError as e:
        print(f"segtrain calibrate: error: {e}", file=sys.stderr)
        return 2
    options = CalibrationOptions(
        budget=args.budget,
        bounded=args.bounded,
        seq_length=args.seq_length,
        segment_size=args.segment_size,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        task_options=task_options,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        l1=args.l1,
        seed=args.seed,
    )
    try:
        record = calibrate_dir(
            args.model, args.out, options, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
            workers=args.workers, save_every=args.save_every, stop_at=args.stop_at,
            activation_checkpointing=args.activation_checkpointing, overwrite=args.overwrite, progress=not args.no_progress,
        )  # fmt: skip
    except CalibrationError as e:
        print(f"segtrain calibrate: error: {e}", file=sys.stderr)
        return 2
    except CalibrationStopped as e:
        rerun = "rerun without --overwrite to continue" if args.overwrite else "rerun the same command to continue"
        where = (f"the state of step {e.saved_step} of {args.steps} is in {args.out} ({rerun})" if e.saved_step is not None
                 else f"no state saved yet; {args.out} is as it was")  # fmt: skip
        print(f"segtrain calibrate: stopped by {e.name}: {where}", file=sys.stderr)
        return e.exit_status
    if record is None:
        print(f"stopped at step {args.stop_at} of {args.steps}; state in {args.out} (rerun the same command to continue)")
        return 0
    print(format_gates(record))
    n = len(record["all_heads"])
    print(
        f"{n} of {len(record['gates']) * len(record['gates'][0])} KV heads read all history, the rest {record['bounded']}; "
        f"{record['steps']} steps in {record['seconds']:.1f}s ({record['seconds_per_step'] * 1000:.0f} ms/step) -> {args.out}"
    )
    return 0
