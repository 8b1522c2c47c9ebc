"""Model recipes: everything the training loop needs from one model implementation, chosen once.

A recipe owns its config section (``portable:``, ``megatron:``: a dataclass that checks itself), checks
what depends on the layout, makes the process groups (:class:`segtrain.parallel.groups.ParallelGroups`),
builds the model with its speed options and parallelisms applied (its one assembly function), adds
its DeepSpeed settings, runs one optimizer step over the step's micro-batches and gathers the
trained weights under HF names. The loop (:mod:`segtrain.train.loop`) never asks which one it runs.

- :class:`~segtrain.train.recipes.portable.PortableRecipe`: ``models/llama.py``; DP/ZeRO 0-3 and CP.
- :class:`~segtrain.train.recipes.megatron.MegatronRecipe`: ``models/megatron.py``; TP and PP through
  megatron-core (1F1B schedule), CP over megatron's CP group, DP/ZeRO 0-2 through DeepSpeed.
"""

from __future__ import annotations

from segtrain.train.recipes.base import ModelRecipe

__all__ = ["ModelRecipe", "recipe_for", "uses_megatron"]


def uses_megatron(cfg) -> bool:
    """``model_impl: megatron``, or TP/PP > 1 (which only the megatron model does)."""
    return cfg.model_impl == "megatron" or cfg.parallel.tp * cfg.parallel.pp > 1


def recipe_for(cfg) -> ModelRecipe:
    if uses_megatron(cfg):
        from segtrain.train.recipes.megatron import MegatronRecipe

        return MegatronRecipe()
    from segtrain.train.recipes.portable import PortableRecipe

    return PortableRecipe()
