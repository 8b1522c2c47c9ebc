"""segtrain: training and inference with the same segment-wise forward (see DESIGN.md)."""

__version__ = "0.1.0"
