"""Hugging Face Llama directory -> segtrain model directory (the same as ``segtrain convert --from hf``).

    python tools/convert_from_hf.py path/to/Llama-3.2-1B runs/llama1b --segment-size 4096 --policy '{fraction: 0.25}'

The output (config.json + model.safetensors) is what ``segtrain train --init-from`` and ``segtrain generate``
read. Options: ``python tools/convert_from_hf.py --help``.
"""

from __future__ import annotations

import sys

from segtrain.convert import main

if __name__ == "__main__":
    sys.exit(main("from"))
