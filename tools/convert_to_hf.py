"""segtrain model or training checkpoint -> Hugging Face Llama directory (the same as ``segtrain convert --to hf``).

    python tools/convert_to_hf.py runs/demo/train/checkpoints hf/demo --dtype bfloat16 --max-shard-size 2GB

SRC is a portable model dir (``OUT/final``), a run's ``checkpoints`` dir (its ``latest``; ``--tag`` picks
another) or one ``step_*`` dir (DeepSpeed ZeRO 0-3). Options: ``python tools/convert_to_hf.py --help``.
"""

from __future__ import annotations

import sys

from segtrain.convert import main

if __name__ == "__main__":
    sys.exit(main("to"))
