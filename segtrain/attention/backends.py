"""The backend registry: every attention backend's name, what it runs on, and its context-parallel form.

The one place that names backends; the config's ``attention_backend``, :func:`segment_attention`,
context parallelism and the benchmarks ask it. A backend runs one whole sequence in the parallel
form, ``run(q, k, v, segment_size, policies, scale, carry_grad) -> out``:

| name | runs on | dtypes | backward | context-parallel form |
| --- | --- | --- | --- | --- |
| ``reference`` | any (materialises ``T x T``: the test oracle) | any | yes | ``math`` |
| ``math`` | any (segment by segment: the CPU training path) | any | yes | ``math`` |
| ``flex`` | CUDA (torch FlexAttention, block-sparse Triton kernels); CPU forward only | fp16, bf16, fp32 | CUDA | ``flex`` |
| ``flash`` | Hopper+ with flash-attn-4 (``flash_attn.cute``): the flex mask run by its kernels | fp16, bf16 | yes | ``flex`` |
| ``te`` | CUDA with Transformer Engine: one fused call per segment and run of heads | fp16, bf16 | yes | ``math`` |
| ``te-fp8`` | the same, forward in FP8: two tiles (own causal, past) merged by LSE; head dim 128 | fp16, bf16 | BF16 | ``math`` |

In document mode (packed documents, :mod:`segtrain.attention.documents`) ``flex`` and ``flash`` put the documents
into their block mask (blocks across documents are skipped); the others run each document as its own call.

``auto`` picks flash, then flex, then math (never te or te-fp8) for the device and dtype at hand. A context-parallel form
is how :mod:`segtrain.parallel.context` runs a rank's share: the segment loop (``math``) or one
FlexAttention call over ``[live | history bank]`` keys (``flex``, CUDA and a segment size that is a
multiple of 128, else ``math``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from segtrain.attention.documents import Documents, per_document
from segtrain.attention.flex import (
    BLOCK,
    flash_available,
    flash_segment_attention,
    flex_available,
    flex_document_attention,
    flex_segment_attention,
)
from segtrain.attention.reference import reference_attention
from segtrain.attention.segmented import segmented_attention
from segtrain.attention.te import te_available, te_fp8_segment_attention, te_segment_attention

__all__ = [
    "AUTO",
    "BACKENDS",
    "BACKEND_NAMES",
    "Backend",
    "check_trains",
    "context_parallel_form",
    "resolve_backend",
    "run_documents",
]

AUTO = "auto"
_ANY = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _anywhere(device: torch.device) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[..., Tensor]
    dtypes: tuple[torch.dtype, ...]
    available: Callable[[torch.device], bool]
    context_parallel: str  # "math" or "flex"
    requirement: str = ""  # what it needs, for the error when it is missing
    trains_on: Callable[[torch.device], bool] | None = None  # where it has a backward (None: wherever it runs)

    def runs(self, q: Tensor) -> bool:
        return q.dtype in self.dtypes and self.available(q.device)

    def trains(self, device: torch.device) -> bool:
        return (self.trains_on or self.available)(device)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", reference_attention, _ANY, _anywhere, "math"),
        Backend("math", segmented_attention, _ANY, _anywhere, "math"),
        Backend(
            "flex",
            flex_segment_attention,
            (torch.float16, torch.bfloat16, torch.float32),
            _anywhere,
            "flex",
            "a CUDA GPU for its backward (torch FlexAttention has none on CPU)",
            trains_on=lambda device: device.type == "cuda",
        ),  # fmt: skip
        Backend(
            "flash",
            flash_segment_attention,
            (torch.float16, torch.bfloat16),
            flash_available,
            "flex",
            "a Hopper (or newer) CUDA GPU and the flash-attn-4 package (`import flash_attn.cute`)",
        ),  # fmt: skip
        Backend(
            "te",
            te_segment_attention,
            (torch.float16, torch.bfloat16),
            te_available,
            "math",
            "a CUDA GPU and Transformer Engine 2.20 (`import transformer_engine.pytorch`; tools/gpu_te.sh shows the install)",
        ),  # fmt: skip
        Backend(
            "te-fp8",
            te_fp8_segment_attention,
            (torch.float16, torch.bfloat16),
            te_available,
            "math",
            "a Hopper (or newer) GPU and Transformer Engine 2.20 (`import transformer_engine.pytorch`; tools/gpu_te.sh)",
        ),  # fmt: skip
    )
}
BACKEND_NAMES = (AUTO, *BACKENDS)
_AUTO_ORDER = ("flash", "flex", "math")


def run_documents(name: str, q: Tensor, k: Tensor, v: Tensor, segment_size: int, policies, scale: float, carry_grad: bool,
                  documents: Documents) -> Tensor:  # fmt: skip
    """Backend ``name`` over packed ``documents``: each document sees exactly what it sees alone."""
    if name in ("flex", "flash"):
        kernels = "FLASH" if name == "flash" else "TRITON"
        return flex_document_attention(q, k, v, segment_size, policies, scale, carry_grad, documents, kernels)
    run = BACKENDS[name].run
    return per_document(lambda qd, kd, vd: run(qd, kd, vd, segment_size, policies, scale, carry_grad), q, k, v, documents)


def check_trains(backend: str, device: torch.device) -> None:
    """Fail, naming what is missing, when a named backend cannot train (run forward and backward) on ``device``;
    ``auto`` always can. Asked before training starts, so a wrong choice is one line, not a traceback mid-step."""
    b = BACKENDS.get(backend)
    if b is not None and not b.trains(device):
        raise ValueError(f"{backend!r} cannot train on {device.type}: it needs {b.requirement}; use auto or math")


def resolve_backend(backend: str, q: Tensor) -> str:
    """The backend that runs ``q``: ``auto`` becomes flash, flex or math (the first that runs this device and dtype;
    flex only on CUDA); a named backend that cannot run here fails naming what it needs.

    On an H100 at T=32K (S=4K, 25% ``all`` heads) forward+backward took 27 ms with flash, 38 ms with
    flex and 92 ms for full causal SDPA-flash (tools/bench_attention.py).
    """
    if backend == AUTO:
        for name in _AUTO_ORDER:
            b = BACKENDS[name]
            if b.runs(q) and (name != "flex" or flex_available(q.device)):
                return name
        return "math"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKEND_NAMES)}")
    b = BACKENDS[backend]
    if not b.available(q.device):
        raise RuntimeError(f"backend={backend!r} needs {b.requirement}; install it or use backend='flex'")
    return backend


def context_parallel_form(backend: str, q: Tensor, segment_size: int) -> str:
    """How context parallelism runs ``backend`` for ``q``: ``"flex"`` (one FlexAttention call per rank) or ``"math"``."""
    if backend == AUTO:
        backend = resolve_backend(AUTO, q)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKEND_NAMES)}")
    flex_ok = q.is_cuda and segment_size % BLOCK == 0 and q.dtype in BACKENDS["flex"].dtypes
    return "flex" if BACKENDS[backend].context_parallel == "flex" and flex_ok else "math"
