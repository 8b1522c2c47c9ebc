"""``python -m segtrain``: the same as the ``segtrain`` command."""

import sys

from segtrain.cli import main

sys.exit(main())
