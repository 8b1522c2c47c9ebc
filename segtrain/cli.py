"""``segtrain <command>``: each command lives in its own module with ``add_arguments`` and ``run``.

Modules are imported only when their command runs, so ``segtrain --help`` stays fast and a command
whose optional dependencies are missing does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS = {
    "train": ("segtrain.train.cli", "train a model from a YAML config (DeepSpeed engine; CPU or GPU)"),
    "generate": ("segtrain.inference.cli", "segmented prefill + decoding from a checkpoint or HF directory"),
    "convert": ("segtrain.convert", "convert checkpoints to and from Hugging Face format"),
    "eval": ("segtrain.eval.cli", "long-context evaluation: passkey, needle-in-a-haystack, perplexity"),
    "calibrate": ("segtrain.calibrate.cli", "learn which KV heads need all history; write the model with that policy table"),
    "preprocess": ("segtrain.data.cli", "train a tokenizer; turn jsonl/text into indexed datasets"),
    "demo": ("segtrain.demo", "the embedded default: tokenizer, data, a tiny CPU training run, generation"),
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is not there either
        return False


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if _exists(spec[0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segtrain", description="segment-wise training and inference for long-context LLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    commands = _available()
    chosen = argv[0] if argv and argv[0] in commands else None
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that runs
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(commands[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
