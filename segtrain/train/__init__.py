"""Training: the DeepSpeed loop behind ``segtrain train``, its configs, checkpoints and logs."""
