"""Process groups: the one source of the parallel layout and its groups (DESIGN.md §4).

World = DP x CP x PP x TP, rank order tp fastest, then cp, then dp, then pp (megatron-core's
default ``tp-cp-ep-dp-pp``). :func:`build_groups` is the one place that makes the process groups
of a layout; when megatron-core's ``parallel_state`` is initialized (the megatron model, with TP, PP and
CP), the groups are read from it instead. Everything else asks :class:`ParallelGroups`: the data-parallel rank, the
CP group, and DeepSpeed through :class:`DeepSpeedMPU`, which reduces gradients of replicated
parameters over DP x CP and names checkpoint files by model-parallel rank
(:func:`model_parallel_rank`). On CPU every group runs over gloo.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from segtrain.errors import UserError


class LayoutError(UserError):
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


def model_parallel_rank(tp_rank: int, pp_rank: int, tp: int) -> int:
    """A rank's index in its TP x PP model-parallel group: the ``XX`` of DeepSpeed's ``mp_rank_XX_model_states.pt``."""
    return tp_rank + tp * pp_rank


def layout_coords(rank: int, layout: Layout) -> dict[str, int]:
    """``{tp, cp, dp, pp}`` coordinates of a global rank (tp fastest, then cp, dp, pp)."""
    tp, rest = rank % layout.tp, rank // layout.tp
    cp, rest = rest % layout.cp, rest // layout.cp
    dp, pp = rest % layout.dp, rest // layout.dp
    return {"tp": tp, "cp": cp, "dp": dp, "pp": pp}


def group_ranks(layout: Layout, dims: tuple[str, ...]) -> list[list[int]]:
    """Every group that varies the coordinates ``dims`` (the others fixed), each sorted by global rank."""
    groups: dict[tuple, list[int]] = {}
    for r in range(layout.world):
        c = layout_coords(r, layout)
        groups.setdefault(tuple(v for k, v in c.items() if k not in dims), []).append(r)
    return sorted(groups.values())


@dataclass
class ParallelGroups:
    """This rank's process groups for a layout; ``dp_cp`` is where gradients of replicated parameters are reduced."""

    layout: Layout
    tp: ProcessGroup
    cp: ProcessGroup
    dp: ProcessGroup
    pp: ProcessGroup
    dp_cp: ProcessGroup
    model_parallel: ProcessGroup  # TP x PP

    @property
    def coords(self) -> dict[str, int]:
        """This rank's ``{tp, cp, dp, pp}`` coordinates."""
        return {name: dist.get_rank(getattr(self, name)) for name in ("tp", "cp", "dp", "pp")}

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp)

    def deepspeed_mpu(self) -> DeepSpeedMPU:
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The ``mpu`` DeepSpeed asks for groups, answered from :class:`ParallelGroups`.

    Its data-parallel group is DP x CP, so it averages gradients over every replica of a parameter (the
    loss on each CP rank is scaled by CP to make that average right); its model-parallel rank names the
    checkpoint file of each (TP, PP) rank; the TP/PP groups let it count split parameters once in the
    gradient norm.
    """

    def __init__(self, groups: ParallelGroups):
        self.g = groups

    def get_data_parallel_group(self):
        return self.g.dp_cp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.g.dp_cp)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.g.dp_cp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.g.dp_cp)

    def get_model_parallel_group(self):
        return self.g.model_parallel

    def get_model_parallel_rank(self) -> int:
        return model_parallel_rank(dist.get_rank(self.g.tp), dist.get_rank(self.g.pp), self.g.layout.tp)

    def get_model_parallel_world_size(self) -> int:
        return self.g.layout.tp * self.g.layout.pp

    def get_tensor_model_parallel_group(self):
        return self.g.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return dist.get_rank(self.g.tp)

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.g.layout.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self.g.tp)[0]

    def get_pipeline_model_parallel_group(self):
        return self.g.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return dist.get_rank(self.g.pp)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.g.layout.pp


def _megatron_groups(layout: Layout) -> ParallelGroups | None:
    """The groups megatron-core's ``parallel_state`` made, when it is initialized (the megatron model path)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return None
    if not ps.model_parallel_is_initialized():
        return None
    return ParallelGroups(
        layout=layout,
        tp=ps.get_tensor_model_parallel_group(),
        cp=ps.get_context_parallel_group(),
        dp=ps.get_data_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        model_parallel=ps.get_model_parallel_group(),
    )


def build_groups(layout: Layout) -> ParallelGroups:
    """This rank's groups for ``layout``; call on every rank (making a group is collective).

    Read from megatron-core's ``parallel_state`` when it is initialized, else made here with the
    same rank order. The world must already be joined (:func:`setup`).
    """
    if dist.get_world_size() != layout.world:
        raise LayoutError(f"layout {layout} needs {layout.world} ranks, the world has {dist.get_world_size()}")
    groups = _megatron_groups(layout)
    if groups is not None:
        return groups
    rank, made = dist.get_rank(), {}
    for name, dims in (("tp", ("tp",)), ("cp", ("cp",)), ("dp", ("dp",)), ("pp", ("pp",)), ("dp_cp", ("dp", "cp")),
                       ("model_parallel", ("tp", "pp"))):  # fmt: skip
        for ranks in group_ranks(layout, dims):  # every rank makes every group, in the same order
            group = dist.group.WORLD if len(ranks) == layout.world else dist.new_group(ranks)
            if rank in ranks:
                made[name] = group
    return ParallelGroups(layout=layout, **made)


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

        from segtrain.compat.deepspeed import clear_stale_build_locks, skip_cpu_comm_op

        if local_rank == 0:
            clear_stale_build_locks()  # a killed op build's lock would make DeepSpeed wait forever
        if device_type == "cpu":
            skip_cpu_comm_op()
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size(), device
