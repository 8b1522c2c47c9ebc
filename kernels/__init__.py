"""Triton kernels for segment attention, installed as ``segtrain.kernels`` (never a top-level ``kernels``)."""
