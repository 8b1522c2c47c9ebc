"""Device memory that segmented generation needs, and the largest batch that fits, from the config alone (issue 34).

So that a run that cannot fit stops before it allocates anything, with one line that says which batch would. Three
parts:

- ``weights``: every parameter once (a tied LM head shares the embedding);
- ``cache``: exactly what :class:`~segtrain.inference.cache.SegmentKVCache` allocates on the device: per layer, K
  and V of ``batch x (sum of its KV heads' capacities + 1) x head_dim``, a head's capacity being
  :func:`~segtrain.inference.cache.policy_capacity` of its policy (``all``: the whole sequence, or two segments
  when its history is offloaded; ``none``: two segments; ``sink:N+window:W``: ``N + W + 2S``);
- ``working``: the largest transient set, a prefill block's on CUDA (SDPA prefill): its activations at their peak
  (the MLP's three ``[batch, chunk, intermediate]`` tensors at most shapes), the ring keys its SDPA gathers in
  position order, the offloaded history staged on the device (two layers, and the copy that puts it in order), and
  the logits. It is above the peaks measured on an H100 at 8B/128K, by at most 0.3 GiB (tests/test_inference_memory.py).

Every part but the weights grows linearly with the batch, so the largest batch that fits is one division.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from segtrain.config import ModelConfig
from segtrain.errors import UserError
from segtrain.inference.cache import policy_capacity
from segtrain.policy import PolicyTable

__all__ = [
    "RESERVE_BYTES",
    "BatchTooLarge",
    "DecodingMemory",
    "check_batch_fits",
    "decoding_memory",
    "device_free_bytes",
    "largest_batch",
]

GIB = 2**30
RESERVE_BYTES = GIB  # left free: cuBLAS workspaces, the CUDA graph's pool, the allocator's fragmentation
LOGITS_BYTES_PER_ENTRY = 16  # [B, V] logits in the model's dtype, float32 for sampling, and sampling's copies


class BatchTooLarge(UserError):
    """The batch's cache and working memory do not fit the device; the message gives the batch that does."""


@dataclass(frozen=True)
class DecodingMemory:
    """Bytes one generation needs: device ``weights``, ``cache`` and ``working`` memory, and pinned ``host`` memory
    (offloaded history)."""

    weights: int
    cache: int
    working: int
    host: int = 0

    def device(self, weights_on_device: bool = False) -> int:
        """Device bytes still to allocate: all three parts, or cache and working memory when the weights are loaded."""
        return self.cache + self.working + (0 if weights_on_device else self.weights)


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in ``dtype`` (what :class:`~segtrain.models.llama.LlamaForCausalLM` holds)."""
    H, D = config.hidden_size, config.head_dim
    attention = 2 * H * config.num_heads * D + 2 * H * config.num_kv_heads * D  # q, o; k, v
    layer = attention + 3 * H * config.intermediate_size + 2 * H  # gate, up, down; two norms
    embeddings = (1 if config.tie_word_embeddings else 2) * config.vocab_size * H
    return (config.num_layers * layer + embeddings + H) * dtype.itemsize


def cache_bytes(
    policies: PolicyTable,
    *,
    batch: int,
    max_length: int,
    segment_size: int,
    head_dim: int,
    dtype: torch.dtype,
    offload_history: bool = False,
) -> tuple[int, int]:
    """``(device, host)`` bytes of the K/V buffers a :class:`SegmentKVCache` of these sizes allocates."""
    device = host = 0
    for row in policies.layers:
        device += sum(policy_capacity(p, segment_size, max_length, offload_history) for p in row) + 1  # + the trash slot
        host += sum(p.all for p in row) * max_length if offload_history else 0
    per_slot = 2 * batch * head_dim * dtype.itemsize  # K and V
    return device * per_slot, host * per_slot


def _activation_bytes_per_token(config: ModelConfig, size: int) -> int:
    """Peak bytes alive per prefill token inside a decoder layer (eager): the largest of its three phases."""
    hidden, inner, q = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    qkv = q + 2 * config.num_kv_heads * config.head_dim
    mlp = (3 * inner + 4 * hidden) * size  # silu(gate), up, their product; the residual, its update, normed, down's output
    attention = (2 * hidden + 2 * qkv + 2 * q) * size  # x, normed; q, k, v before and after RoPE; RoPE's temporaries
    norm = 2 * hidden * size + 2 * hidden * 4  # input and output, two float32 copies inside
    return max(mlp, attention, norm)


def _gathered_bytes(
    policies: PolicyTable, *, batch: int, max_length: int, segment_size: int, head_dim: int, size: int, offload_history: bool
) -> int:
    """Keys a prefill block copies for one layer (the largest): ring heads' keys put in position order (twice when
    sinks are concatenated in front), and offloaded history staged for two layers plus its ordered copy."""
    most = 0
    for row in policies.layers:
        keys = 0
        for p in row:
            capacity = policy_capacity(p, segment_size, max_length, offload_history)
            if p.all and offload_history:
                keys += 3 * max_length + capacity
            elif not p.all:
                keys += (2 if p.sink else 1) * capacity
        most = max(most, keys)
    return most * 2 * batch * head_dim * size


def decoding_memory(
    config: ModelConfig,
    batch: int,
    max_length: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    prefill_chunk: int = 1024,
    offload_history: bool = False,
) -> DecodingMemory:
    """What generating ``batch`` sequences of up to ``max_length`` positions (prompt + new tokens) needs, with the
    policy and segment size of ``config``; ``prefill_chunk`` is the engine's (default 1024, at most a segment)."""
    if batch < 1 or max_length < 1:
        raise ValueError(f"batch and max_length must be >= 1, got batch={batch}, max_length={max_length}")
    policies, S, size = config.policy_table(), config.segment_size, dtype.itemsize
    sizes = dict(batch=batch, max_length=max_length, segment_size=S, head_dim=config.head_dim)
    cache, host = cache_bytes(policies, **sizes, dtype=dtype, offload_history=offload_history)
    chunk = min(prefill_chunk, S, max_length)
    working = (
        batch * chunk * _activation_bytes_per_token(config, size)
        + _gathered_bytes(policies, **sizes, size=size, offload_history=offload_history)
        + batch * config.vocab_size * LOGITS_BYTES_PER_ENTRY
    )
    return DecodingMemory(weight_bytes(config, dtype), cache, working, host)


def largest_batch(
    config: ModelConfig,
    max_length: int,
    free_bytes: int,
    *,
    weights_on_device: bool = False,
    reserve_bytes: int = RESERVE_BYTES,
    **kwargs,
) -> int:
    """The largest batch whose :func:`decoding_memory` (``kwargs``: its options) leaves ``reserve_bytes`` of
    ``free_bytes``; 0 when not even one sequence fits."""
    one = decoding_memory(config, 1, max_length, **kwargs)
    per_row = one.cache + one.working
    budget = free_bytes - reserve_bytes - (0 if weights_on_device else one.weights)
    return max(0, budget // per_row)


def check_batch_fits(
    config: ModelConfig,
    batch: int,
    max_length: int,
    free_bytes: int,
    *,
    weights_on_device: bool = False,
    reserve_bytes: int = RESERVE_BYTES,
    **kwargs,
) -> DecodingMemory:
    """The estimate for ``batch``, or :class:`BatchTooLarge` (one line, with the batch that fits) when it does not fit."""
    need = decoding_memory(config, batch, max_length, **kwargs)
    if need.device(weights_on_device) + reserve_bytes <= free_bytes:
        return need
    fits = largest_batch(
        config, max_length, free_bytes, weights_on_device=weights_on_device, reserve_bytes=reserve_bytes, **kwargs
    )
    what = f"KV cache {need.cache / GIB:.1f}, working {need.working / GIB:.1f}"
    what += "" if weights_on_device else f", weights {need.weights / GIB:.1f}"
    advice = f"at most batch {fits} fits" if fits else "no batch fits: shorten the sequences or offload the history"
    raise BatchTooLarge(
        f"batch {batch} at {max_length} positions needs {(need.device(weights_on_device) + reserve_bytes) / GIB:.1f} GiB "
        f"({what}, {reserve_bytes / GIB:.1f} reserved), the device has {free_bytes / GIB:.1f} free: {advice}"
    )


def device_free_bytes(device: torch.device | str | None = None) -> int:
    """Bytes a CUDA device can still give: free on the device plus what PyTorch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
