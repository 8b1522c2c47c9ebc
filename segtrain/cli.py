"""``segtrain <command>``: each command lives in its own module with ``add_arguments`` and ``run``.

Modules are imported only when their command runs, so ``segtrain --help`` stays fast and a command
whose optional dependencies are missing does not break the others. A :class:`~segtrain.errors.UserError`
(a bad field, flag, file or folder) ends the command with one line on stderr and exit status 2; ``--debug``
shows its traceback. Ctrl-C outside training (which saves first: :mod:`segtrain.train.signals`) exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import segtrain
from segtrain.errors import EXIT_USER_ERROR, UserError

COMMANDS = {
    "train": ("segtrain.train.cli", "train a model from a YAML config (DeepSpeed engine; CPU or GPU)"),
    "generate": ("segtrain.inference.cli", "segmented prefill + decoding from a model dir, a training run or an HF directory"),
    "convert": ("segtrain.convert", "convert checkpoints to and from Hugging Face format"),
    "eval": ("segtrain.eval.cli", "long-context evaluation: passkey, needle-in-a-haystack, perplexity"),
    "calibrate": ("segtrain.calibrate.cli", "learn which KV heads need all history; write the model with that policy table"),
    "preprocess": ("segtrain.data.cli", "train a tokenizer; turn jsonl/text into indexed datasets"),
    "demo": ("segtrain.demo", "the embedded default: tokenizer, data, a tiny CPU training run, generation"),
}


def _exists(module: str) -> bool:
    """Whether ``module`` is installed, without importing it or its packages (their imports can be slow)."""
    parts = module.split(".")
    if parts[0] == "segtrain":
        base = Path(segtrain.__file__).parent.joinpath(*parts[1:])
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is not there either
        return False


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if _exists(spec[0])}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help already speaks of it or there is none to show
    (None, False, an empty list): argparse's ArgumentDefaultsHelpFormatter, without "(default: False)" on every flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "default" in text or default is None or default is False or default == []:
            return text
        if default is argparse.SUPPRESS or text is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _report(command: str, message: str) -> None:
    """One line on stderr; under a launcher, ranks other than 0 say which rank they are."""
    rank = os.environ.get("RANK", "0")
    print(f"segtrain {command}: {'' if rank == '0' else f'[rank {rank}] '}{message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segtrain", description="segment-wise training and inference for long-context LLMs")
    parser.add_argument("--version", action="version", version=f"segtrain {segtrain.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    commands = _available()
    chosen = argv[0] if argv and argv[0] in commands else None
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
        if name == chosen:  # import only the module that runs
            importlib.import_module(module).add_arguments(p)
            p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(commands[args.command][0]).run(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        _report(args.command, f"error: {e}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        _report(args.command, "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
