"""``grad_norm`` in metrics.jsonl: the global gradient norm of the step, before clipping.

DeepSpeed's ZeRO 1-3 optimizers compute it in their step, before they clip, and keep it
(``engine.get_global_grad_norm()``); ZeRO-0 runs a torch optimizer and keeps none
(:func:`segtrain.compat.deepspeed.optimizer_keeps_grad_norm`). There the loop measures it on the steps it
logs, once the step's gradients are reduced and before the optimizer uses them (:func:`global_grad_norm`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from segtrain.parallel.groups import ParallelGroups

__all__ = ["GradNorm", "global_grad_norm"]


def global_grad_norm(parameters: Iterable[torch.nn.Parameter], groups: ParallelGroups) -> Tensor:
    """The 2-norm of the whole model's gradient from this rank's ``.grad`` (float64; collective over TP x PP).

    Each rank holds its pipeline stage and, of a tensor-parallel parameter (megatron's ``tensor_model_parallel``
    attribute), its shard: those are summed over the TP x PP group; a parameter every TP rank holds whole is
    counted on TP rank 0 only. DP and CP replicas hold the same reduced gradient and are counted once.
    """
    parameters = list(parameters)
    counts_replicated = dist.get_rank(groups.tp) == 0
    total = torch.zeros((), dtype=torch.float64, device=parameters[0].device)
    for p in parameters:
        if p.grad is not None and (counts_replicated or getattr(p, "tensor_model_parallel", False)):
            precision = torch.promote_types(p.grad.dtype, torch.float32)  # bf16 read in float32, without a copy on CUDA
            total += torch.linalg.vector_norm(p.grad, dtype=precision).double() ** 2
    if dist.get_world_size(groups.model_parallel) > 1:
        dist.all_reduce(total, group=groups.model_parallel)
    return total.sqrt()


class GradNorm:
    """The value the loop logs: DeepSpeed's where its optimizer keeps one, else :meth:`measure`'s (call it on every rank)."""

    def __init__(self, engine, groups: ParallelGroups):
        from segtrain.compat.deepspeed import optimizer_keeps_grad_norm

        self.engine, self.groups = engine, groups
        self.measures = not optimizer_keeps_grad_norm(engine)
        self._measured: Tensor | None = None

    def measure(self) -> None:
        self._measured = global_grad_norm(self.engine.module.parameters(), self.groups)

    def value(self) -> float | None:
        """The last step's norm; None where it was not measured (ZeRO-0, a step logged only because the run stops)."""
        if self.measures:
            norm, self._measured = self._measured, None
        else:
            norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)
