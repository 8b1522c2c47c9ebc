"""jsonl/text -> megatron-core indexed dataset, as a script (the same as ``segtrain preprocess data``).

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer runs/tokenizer --out data/corpus --workers 8

Writes ``data/corpus.bin`` and ``data/corpus.idx`` (each document's tokens, then EOD) and prints the
throughput. Options: ``python tools/preprocess_data.py --help``.
"""

from __future__ import annotations

import argparse
import sys

from segtrain.data import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preprocess_data", description=__doc__.splitlines()[0])
    cli.add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("corpus", "tokenizer", "data"):
        argv = ["data", *argv]  # the default subcommand: this script is for datasets
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
