"""Long-context evaluation (``segtrain eval``) and the lm-evaluation-harness backend.

- ``modes``: execution modes (``full``: plain causal attention; ``segmented``: the model's own or an
  overridden segment size and policy) over shared weights.
- ``retrieval``: passkey / needle / recall samples with needles placed by distance (own segment,
  previous segment, history), scored exactly (one teacher-forced forward, or real greedy generation).
- ``perplexity``: held-out perplexity per segment index. ``prefill``: peak memory and time of prefill.
- ``evaluate``: the plan and the loop over lengths and modes. ``report``: markdown and plots.
- ``load``: a segtrain model dir, a run's checkpoints, or a Hugging Face Llama dir.
- ``harness``: the ``segtrain`` model for lm-evaluation-harness (``lm-eval``, the ``eval`` extra).
"""
