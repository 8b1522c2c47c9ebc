"""megatron-core workarounds (checked with 0.16; the GPU image carries 0.16.1).

1. :func:`segment_rotary_embedding`: megatron's llama3 RoPE scaling hard-codes three of its four
   parameters, ``get_emb`` moves ``inv_freq`` to CUDA whatever the model's device, and ``GPTModel``
   gives its rotary module a length only (angles of ``0..T-1``), which ``forward`` slices in megatron's
   zig-zag CP layout when the CP group has more than one rank. The subclass takes the frequencies from
   :func:`segtrain.models.llama.rope_inv_freq`, keeps them where they are (the CPU tests run the
   megatron model in float64) and turns the model's ``position_ids`` into angles: segtrain's CP shard
   is a contiguous run of whole segments (uneven under the balanced split), so its tokens sit at
   absolute positions ``lo..hi-1``, never sliced.
2. :func:`segment_gpt_model`: a ``GPTModel`` whose loss path runs the output layer and vocab-parallel
   cross-entropy on chunks of positions, overriding ``GPTModel._postprocess`` (a private method):
   full-vocabulary logits (8 GiB in bf16 at T=32K, V=128K) never exist; and whose ``forward`` hands
   ``position_ids`` to the rotary module (1.).
3. :func:`single_process_rank`: ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unguarded;
   without a process group it is answered with 0.
4. :func:`cpu_collectives`: megatron's TP gathers and PP sends allocate their buffers on
   ``torch.cuda.current_device()``, its 1F1B schedule counts tokens in a ``device="cuda"`` tensor and
   its batched sends end in ``torch.cuda.synchronize()``; on CPU (gloo: the TP/PP/CP tests and CPU
   runs) those modules see a ``torch`` whose CUDA device is the CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
from functools import cache
from unittest import mock

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from segtrain.compat import warn_if_untested

__all__ = [
    "TESTED",
    "check_version",
    "cpu_collectives",
    "segment_gpt_model",
    "segment_rotary_embedding",
    "single_process_rank",
]

TESTED = ("0.16.",)
POSTPROCESS_PARAMS = ("self", "hidden_states", "input_ids", "position_ids", "labels")  # the leading ones we pass through


def check_version() -> bool:
    import megatron.core

    return warn_if_untested("megatron-core", megatron.core.__version__, TESTED)


@cache
def _segment_rotary_class():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    class SegmentRotaryEmbedding(RotaryEmbedding):
        """megatron's non-interleaved RoPE with given inverse frequencies, kept on their own device, at the model's
        ``position_ids`` (``positions``, set by :func:`segment_gpt_model` for one forward) or else ``0..T-1``."""

        def __init__(self, inv_freq: Tensor, *, kv_channels: int, shared_positions: bool = False):
            super().__init__(kv_channels=kv_channels, rotary_percent=1.0, use_cpu_initialization=True)
            self.inv_freq = inv_freq
            self.positions: Tensor | None = None
            self.shared_positions = shared_positions  # TE's fused RoPE takes one row of angles, [T, 1, 1, D]

        def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
            """``[T, 1, 1, D]`` float32 angles of positions ``offset..offset + T``."""
            freqs = self.get_freqs_non_repeated(max_seq_len, offset)
            return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

        def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> Tensor:
            """Angles ``[T, B, 1, D]`` of ``positions [B, T]`` (``[T, 1, 1, D]`` of ``offset..offset + T`` without them);
            never cached, never sliced by CP rank (``cp_group`` is ignored: segtrain's CP shards hold their positions)."""
            if packed_seq:
                raise ValueError("segment attention takes whole sequences: no packed sequences")
            if self.positions is None:
                return self.get_emb(max_seq_len, offset)
            positions = self.positions
            if positions.shape[-1] != max_seq_len:
                raise ValueError(f"position_ids cover {positions.shape[-1]} tokens, the decoder runs {max_seq_len}")
            if self.shared_positions and positions.shape[0] > 1:
                if not torch.equal(positions, positions[:1].expand_as(positions)):
                    raise ValueError(
                        "position_ids differ between the rows of a micro-batch, which TE's fused RoPE cannot take: "
                        "set data.reset_position_ids: false or micro_batch_size: 1"
                    )
                positions = positions[:1]
            freqs = (positions.t()[..., None] + offset).to(self.inv_freq.dtype) * self.inv_freq.to(self.positions.device)
            return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]

    return SegmentRotaryEmbedding


def segment_rotary_embedding(inv_freq: Tensor, *, kv_channels: int, shared_positions: bool = False):
    """A ``RotaryEmbedding`` (subclass) over ``inv_freq``, to put in ``GPTModel.rotary_pos_emb``. ``shared_positions``
    (megatron's ``apply_rope_fusion``): one row of angles for the micro-batch, whose rows must share their positions."""
    check_version()
    return _segment_rotary_class()(inv_freq, kv_channels=kv_channels, shared_positions=shared_positions)


@cache
def segment_gpt_model():
    """``GPTModel`` whose RoPE runs at ``position_ids`` (with :func:`segment_rotary_embedding` as its rotary module) and
    whose loss path (``labels=...``) runs output layer + cross-entropy ``loss_chunk_size`` positions at a time, each
    chunk under activation checkpointing, as the portable model does."""
    check_version()
    from megatron.core.models.gpt import GPTModel

    class SegmentGPTModel(GPTModel):
        loss_chunk_size = 1024

        def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
            """megatron's forward, with RoPE at ``position_ids [B, T]`` (absolute: a CP shard's own) when given."""
            rope = getattr(self, "rotary_pos_emb", None)
            if rope is None or not hasattr(rope, "positions"):
                return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
            rope.positions = position_ids
            try:
                return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
            finally:
                rope.positions = None

        def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
            seq_len = hidden_states.shape[0]
            if labels is None or not self.post_process or self.config.mtp_num_layers or seq_len <= self.loss_chunk_size:
                return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
            weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None

            def chunk_loss(h: Tensor, y: Tensor) -> Tensor:
                logits, _ = self.output_layer(h, weight=weight)
                return self.compute_language_model_loss(y, logits)

            c = self.loss_chunk_size
            parts = [
                checkpoint(chunk_loss, hidden_states[a : a + c], labels[:, a : a + c], use_reentrant=False)
                for a in range(0, seq_len, c)
            ]
            return torch.cat(parts, dim=1)

    return SegmentGPTModel


def postprocess_signature_matches() -> bool:
    """``GPTModel._postprocess`` still takes the leading parameters the override passes through."""
    from megatron.core.models.gpt import GPTModel

    names = tuple(inspect.signature(GPTModel._postprocess).parameters)[: len(POSTPROCESS_PARAMS)]
    return names == POSTPROCESS_PARAMS


@contextlib.contextmanager
def single_process_rank():
    """Without a process group, answer ``BlendedDataset``'s unguarded ``torch.distributed.get_rank()`` with 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    check_version()
    with mock.patch.object(torch.distributed, "get_rank", lambda group=None: 0, create=True):
        yield


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` whose current device is the CPU and whose synchronize has nothing to wait for."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None) -> None:
        return None


class _TorchOnCpu(types.ModuleType):
    """``torch`` as a megatron module sees it under :func:`cpu_collectives`: CUDA allocations land on the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs) -> Tensor:
        return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)


CUDA_ALLOCATING_MODULES = (  # megatron-core 0.16 modules on the TP gather / PP send path that allocate on CUDA
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
)


@contextlib.contextmanager
def cpu_collectives():
    """megatron's TP gathers, PP sends and 1F1B schedule on CPU tensors (gloo) inside the block.

    Only the modules of :data:`CUDA_ALLOCATING_MODULES` see the changed ``torch``; everything else, and those
    modules outside the block, see the real one.
    """
    check_version()
    modules = [importlib.import_module(name) for name in CUDA_ALLOCATING_MODULES]
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(mock.patch.object(module, "torch", _TorchOnCpu()))
        yield
