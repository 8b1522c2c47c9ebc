"""Process groups: one place that knows the parallel layout (DESIGN.md §4).

World = DP x CP x PP x TP. DeepSpeed owns data parallelism (ZeRO); megatron-core's
``parallel_state`` owns the TP/PP/CP groups when they are larger than 1 (CUDA only). On CPU runs
only data parallelism exists, over gloo with DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


class LayoutError(ValueError):
    """A parallel layout that does not fit the world size, naming the field."""


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def make_layout(world: int, tp: int = 1, pp: int = 1, cp: int = 1) -> Layout:
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp)):
        if value < 1:
            raise LayoutError(f"{name}={value} must be >= 1")
    model_parallel = tp * pp * cp
    if world % model_parallel:
        raise LayoutError(
            f"parallel.tp x parallel.pp x parallel.cp = {tp} x {pp} x {cp} = {model_parallel} "
            f"does not divide the world size {world}"
        )
    return Layout(tp=tp, pp=pp, cp=cp, dp=world // model_parallel)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device_type: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group the launcher describes (or make a world of one); returns (rank, world, device)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size(), device
