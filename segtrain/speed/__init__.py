"""Speed options applied to a built model from outside (compile, activation checkpointing, host offload), and
the portable model's assembly (:func:`segtrain.speed.portable.parallelize_portable`), the one place that orders them."""
