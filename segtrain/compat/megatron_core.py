"""megatron-core workarounds (checked with 0.16; the GPU image carries 0.16.1).

1. :func:`segment_rotary_embedding`: megatron's llama3 RoPE scaling hard-codes three of its four
   parameters, and ``get_emb`` moves ``inv_freq`` to CUDA whatever the model's device; the subclass
   takes the frequencies from :func:`segtrain.models.llama.rope_inv_freq` and keeps them where they are
   (the CPU tests run the megatron model in float64).
2. :func:`chunked_loss_gpt_model`: a ``GPTModel`` whose loss path runs the output layer and
   vocab-parallel cross-entropy on chunks of positions, overriding ``GPTModel._postprocess`` (a
   private method): full-vocabulary logits (8 GiB in bf16 at T=32K, V=128K) never exist.
3. :func:`single_process_rank`: ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unguarded;
   without a process group it is answered with 0.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import cache
from unittest import mock

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from segtrain.compat import warn_if_untested

__all__ = ["TESTED", "check_version", "chunked_loss_gpt_model", "segment_rotary_embedding", "single_process_rank"]

TESTED = ("0.16.",)
POSTPROCESS_PARAMS = ("self", "hidden_states", "input_ids", "position_ids", "labels")  # the leading ones we pass through


def check_version() -> bool:
    import megatron.core

    return warn_if_untested("megatron-core", megatron.core.__version__, TESTED)


@cache
def _segment_rotary_class():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    class SegmentRotaryEmbedding(RotaryEmbedding):
        """megatron's non-interleaved RoPE with given inverse frequencies, kept on their own device."""

        def __init__(self, inv_freq: Tensor, *, kv_channels: int, cp_group=None):
            super().__init__(kv_channels=kv_channels, rotary_percent=1.0, use_cpu_initialization=True, cp_group=cp_group)
            self.inv_freq = inv_freq

        def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
            """``[T, 1, 1, D]`` float32 angles of positions ``offset..offset + T``."""
            freqs = self.get_freqs_non_repeated(max_seq_len, offset)
            return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    return SegmentRotaryEmbedding


def segment_rotary_embedding(inv_freq: Tensor, *, kv_channels: int, cp_group=None):
    """A ``RotaryEmbedding`` (subclass) over ``inv_freq``, to put in ``GPTModel.rotary_pos_emb``."""
    check_version()
    return _segment_rotary_class()(inv_freq, kv_channels=kv_channels, cp_group=cp_group)


@cache
def chunked_loss_gpt_model():
    """``GPTModel`` whose loss path (``labels=...``) runs output layer + cross-entropy ``loss_chunk_size`` positions at a
    time, each chunk under activation checkpointing, as the portable model does."""
    check_version()
    from megatron.core.models.gpt import GPTModel

    class ChunkedLossGPTModel(GPTModel):
        loss_chunk_size = 1024

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

    return ChunkedLossGPTModel


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
