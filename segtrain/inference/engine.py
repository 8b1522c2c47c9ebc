"""Segmented generation: prefill segment by segment, then decode token by token (DESIGN.md §1).

The engine runs the model's own layers; only the attention slot of each layer is filled, for the
duration of a step, with the KV cache (:class:`CachedAttention` over :meth:`SegmentKVCache.attend`).
Prefill feeds one segment (or a chunk of one) at a time, so only that block's activations are alive,
and computes logits for each prompt's last position only. Decoding continues the same segmentation:
a token at position ``t`` is in segment ``t // S`` and sees what any token at ``t`` sees.

Prompts of different lengths share blocks by absolute position: each row takes the part of the
block its prompt covers; the rest is padding that never enters the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from segtrain.attention import SegmentAttention, filled_slots
from segtrain.inference.cache import Block, SegmentKVCache
from segtrain.models.llama import LlamaForCausalLM

__all__ = ["CachedAttention", "GenerationOutput", "SegmentedEngine", "sample_next"]


class CachedAttention(nn.Module):
    """What fills a layer's attention slot during a step: the block's K/V go into the cache, attention reads it."""

    def __init__(self, cache: SegmentKVCache, layer: int):
        super().__init__()
        self.cache, self.layer = cache, layer

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.cache.attend(self.layer, q, k, v)


@dataclass
class GenerationOutput:
    """New tokens per prompt (stop token excluded), why each stopped (``"stop"`` or ``"length"``), and cache size."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    cache_bytes: int = 0
    offloaded_bytes: int = 0
    step_logits: list[Tensor] = field(default_factory=list)  # [B, V] per sampled token, when asked for


def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Next token per row of ``logits [B, V]``: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


DEFAULT_PREFILL_CHUNK = 1024


class SegmentedEngine:
    """Prefill and decode a :class:`LlamaForCausalLM` with a per-head :class:`SegmentKVCache`.

    Args:
        model: the model (any device and dtype; the cache follows its parameters).
        offload_history: keep ``all`` heads' history in (pinned) host memory, streamed per layer.
        sdpa_prefill: run multi-token blocks with SDPA over ``[history, previous, current]`` keys and a
            lower-right causal mask; None means on CUDA only.
        prefill_chunk: query tokens per prefill block, at most the segment size. The default, 1024,
            bounds the per-block activations (the MLP's intermediate dominates): at Llama-3-8B shape,
            128K, 25% ``all`` heads on an H100 it cut peak memory beyond the weights from 5.21 to
            4.86 GiB for 9.20 s instead of 8.31 s of prefill (tools/bench_prefill.py).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        *,
        offload_history: bool = False,
        sdpa_prefill: bool | None = None,
        prefill_chunk: int | None = None,
    ):
        self.model = model
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.offload_history = offload_history
        self.sdpa_prefill = self.device.type == "cuda" if sdpa_prefill is None else sdpa_prefill
        S = self.config.segment_size
        self.prefill_chunk = min(S, DEFAULT_PREFILL_CHUNK if prefill_chunk is None else max(1, prefill_chunk))

    def new_cache(self, batch_size: int, max_length: int) -> SegmentKVCache:
        c = self.config
        return SegmentKVCache(
            self.model.model.policies,
            batch_size=batch_size,
            max_length=max_length,
            segment_size=c.segment_size,
            num_heads=c.num_heads,
            head_dim=c.head_dim,
            dtype=self.dtype,
            device=self.device,
            offload_history=self.offload_history,
            sdpa_prefill=self.sdpa_prefill,
        )

    @torch.inference_mode()
    def step(self, cache: SegmentKVCache, tokens: Tensor, block: Block) -> Tensor:
        """Run one block of new tokens ``[B, width]`` through every layer; returns pre-norm hidden ``[B, width, H]``."""
        model = self.model.model
        x = model.embed_tokens(tokens.to(self.device))
        positions = block.positions(self.device)
        rope = model.rope(positions.clamp(min=0), x.dtype)
        cache.begin_block(block)

        def cached(slot: SegmentAttention) -> CachedAttention:
            return CachedAttention(cache, slot.layer)

        with filled_slots(self.model, cached):
            for i, layer in enumerate(model.layers):
                cache.prefetch(i + 1)
                x = layer(x, rope)
        return x

    @torch.inference_mode()
    def prefill(self, cache: SegmentKVCache, prompts: Sequence[Sequence[int] | Tensor], *, all_logits: bool = False) -> Tensor:
        """Feed the prompts (lists or 1-D tensors of ids) segment by segment; returns each prompt's last-token logits ``[B, V]``.

        ``all_logits=True`` returns ``[B, T_max, V]`` for every position instead (tests; padding rows garbage).
        """
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        T, S = max(lengths), self.config.segment_size
        tokens = torch.zeros(len(prompts), T, dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens[row, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        last: list[Tensor | None] = [None] * len(prompts)
        pieces = []
        start = 0
        while start < T:
            stop = min(start + self.prefill_chunk, (start // S + 1) * S, T)
            counts = tuple(max(0, min(n, stop) - start) for n in lengths)
            hidden = self.step(cache, tokens[:, start:stop], Block((start,) * len(prompts), counts))
            for row, n in enumerate(lengths):
                if start <= n - 1 < stop:
                    last[row] = hidden[row, n - 1 - start].clone()  # not a view: the block's activations can go
            if all_logits:
                pieces.append(hidden)
            start = stop
        if all_logits:
            return self.model.logits(torch.cat(pieces, dim=1))
        return self.model.logits(torch.stack(last))

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_tokens: Sequence[int] = (),
        return_logits: bool = False,
    ) -> GenerationOutput:
        """Greedy (``temperature=0``) or nucleus-sampled continuation of a batch of prompts."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        cache = self.new_cache(B, max(lengths) + max_new_tokens)
        logits = self.prefill(cache, prompts)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stop = set(int(t) for t in stop_tokens)
        out: list[list[int]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        active = [True] * B
        next_pos = list(lengths)
        step_logits = []
        while True:
            if return_logits:
                step_logits.append(logits.cpu())
            chosen = sample_next(logits, temperature, top_p, generator).cpu()
            for row in range(B):
                if not active[row]:
                    continue
                token = int(chosen[row])
                if token in stop:
                    active[row], reasons[row] = False, "stop"
                    continue
                out[row].append(token)
                if len(out[row]) >= max_new_tokens:
                    active[row] = False
            if not any(active):
                break
            counts = tuple(int(a) for a in active)
            hidden = self.step(cache, chosen[:, None], Block(tuple(next_pos), counts))
            next_pos = [p + c for p, c in zip(next_pos, counts)]
            logits = self.model.logits(hidden[:, 0])
        return GenerationOutput(out, reasons, cache.memory_bytes(), cache.offloaded_bytes(), step_logits)
