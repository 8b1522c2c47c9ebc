"""Segmented generation: prefill segment by segment, then decode token by token (DESIGN.md §1).

The engine runs the model's own layers, each as one step (:meth:`LlamaForCausalLM.layer_steps`) whose
attention is the KV cache (:class:`CachedAttention` over :meth:`SegmentKVCache.attend`); it touches
nothing inside the model, except that with ``fuse_projections=True`` it fuses the projections' weights
(:meth:`LlamaForCausalLM.fuse_projections`: same parameters and state dict, fewer GEMMs).
Prefill feeds one segment (or a chunk of one) at a time, so only that block's activations are alive,
and computes logits for each prompt's last position only. Decoding continues the same segmentation:
a token at position ``t`` is in segment ``t // S`` and sees what any token at ``t`` sees.

Decoding (:class:`Decoder`) is one step with fixed shapes: token ids and positions are device
tensors, the cache's slots follow from the positions on the device, and the next token is chosen on
the device; on CUDA the step is captured once as a CUDA graph and replayed, with the decoder
layers compiled by ``torch.compile`` (the attention call stays outside the compiled regions). The
host reads each step's tokens while the device already runs the next step.

Prompts of different lengths share prefill blocks by absolute position: each row takes the part of
the block its prompt covers; the rest is padding that never enters the cache. In decoding every row
advances by one position per step from its own prompt length.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from segtrain.attention import attention_slots
from segtrain.inference.cache import DECODE_ATTENTION, Block, SegmentKVCache
from segtrain.models.llama import LlamaForCausalLM

__all__ = ["CachedAttention", "Decoder", "GenerationOutput", "SegmentedEngine", "sample_next"]

DECODE_MODES = ("graph", "eager")


class CachedAttention(nn.Module):
    """A layer step's attention: the step's K/V go into the cache, attention reads it.

    Its ``cache`` is set for each step (the same module serves every cache of an engine, so compiled
    layers never see a new object); the call stays outside ``torch.compile``'d regions.
    """

    def __init__(self, layer: int, cache: SegmentKVCache | None = None):
        super().__init__()
        self.layer, self.cache = layer, cache

    @torch.compiler.disable
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.cache.attend(self.layer, q, k, v)


@dataclass
class GenerationOutput:
    """New tokens per prompt (stop token excluded), why each stopped (``"stop"`` or ``"length"``), cache size, timing."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    cache_bytes: int = 0
    offloaded_bytes: int = 0
    step_logits: list[Tensor] = field(default_factory=list)  # [B, V] per sampled token, when asked for
    prefill_s: float = 0.0
    setup_s: float = 0.0  # building the decoding step (compiling, CUDA graph capture)
    decode_s: float = 0.0  # from the first decoding step to the last token on the host
    decode_steps: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the batch during decoding (steps after the first token, all rows)."""
        return self.decode_steps * len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0


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
GRAPH_MIN_NEW_TOKENS = 16


class SegmentedEngine:
    """Prefill and decode a :class:`LlamaForCausalLM` with a per-head :class:`SegmentKVCache`.

    Args:
        model: the model (any device and dtype; the cache follows its parameters).
        offload_history: keep ``all`` heads' history in (pinned) host memory, streamed per layer
            (decoding then runs eagerly, with ``decode_attention="torch"``).
        sdpa_prefill: run multi-token blocks with SDPA over ``[history, previous, current]`` keys and a
            lower-right causal mask; None means on CUDA only.
        prefill_chunk: query tokens per prefill block, at most the segment size. The default, 1024,
            bounds the per-block activations (the MLP's intermediate dominates): at Llama-3-8B shape,
            128K, 25% ``all`` heads on an H100 it cut peak memory beyond the weights from 5.21 to
            4.86 GiB for 9.20 s instead of 8.31 s of prefill (tools/bench_prefill.py).
        decode: ``"graph"`` (the decoding step captured as a CUDA graph; CUDA only) or ``"eager"``;
            ``"auto"``: graph on CUDA unless the attention or offloading needs the host, and for
            generations of at least ``GRAPH_MIN_NEW_TOKENS`` (16) tokens (capturing costs a few steps).
        decode_attention: attention of a decoding step: ``"triton"`` (the split-KV kernel of
            :mod:`segtrain.kernels.decode_attention`), ``"sdpa"`` (masked SDPA per policy group) or
            ``"torch"`` (exact, any device and dtype); ``"auto"``: triton on CUDA, torch elsewhere.
        compile_decode: ``torch.compile`` the decoder layers of the graph-captured step (fusing norms,
            RoPE, SwiGLU); None means with ``decode="graph"``. A string or callable is the compile backend
            (tests use ``"eager"``). A failing compile falls back to the plain layers with a warning.
        fuse_projections: run each layer's q|k|v and gate|up projections as one GEMM each
            (:meth:`LlamaForCausalLM.fuse_projections`, done here on the given model: its weights become views of
            the fused ones, no copy; the model then refuses a forward with gradients until ``unfuse_projections()``);
            None: on CUDA (unless DeepSpeed ZeRO manages the weights), where it takes 0.4-0.5 ms off an 8B decoding
            step on an H100 (``docs/bench/README.md``, Decoding); off on CPU, where it gains nothing measured.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        *,
        offload_history: bool = False,
        sdpa_prefill: bool | None = None,
        prefill_chunk: int | None = None,
        decode: str = "auto",
        decode_attention: str = "auto",
        compile_decode: bool | str | Callable | None = None,
        fuse_projections: bool | None = None,
    ):
        self.model = model
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if fuse_projections is None:
            fuse_projections = self.device.type == "cuda" and not model.zero_managed
        if fuse_projections:
            model.fuse_projections()
        self.offload_history = offload_history
        self.sdpa_prefill = self.device.type == "cuda" if sdpa_prefill is None else sdpa_prefill
        S = self.config.segment_size
        self.prefill_chunk = min(S, DEFAULT_PREFILL_CHUNK if prefill_chunk is None else max(1, prefill_chunk))
        self.decode_attention = self._resolve_attention(decode_attention)
        self.decode = self._resolve_decode(decode)
        self._decode_chosen = decode != "auto"
        if compile_decode is None:
            compile_decode = self.decode == "graph"
        self.compile_backend = ("inductor" if compile_decode is True else compile_decode) or None
        self._attention = [CachedAttention(i) for i in range(self.config.num_layers)]
        self._compiled: list[Callable] | None = None

    def _resolve_attention(self, name: str) -> str:
        from segtrain.kernels.decode_attention import available

        if name not in ("auto", *DECODE_ATTENTION):
            raise ValueError(f"decode_attention must be 'auto' or one of {DECODE_ATTENTION}, got {name!r}")
        probe = torch.empty(1, 1, self.config.head_dim, dtype=self.dtype, device=self.device)
        if name == "auto":
            return "triton" if self.device.type == "cuda" and not self.offload_history and available(probe) else "torch"
        if name != "torch" and self.offload_history:
            raise ValueError(f"decode_attention={name!r} cannot read offloaded history: use 'torch' with offload_history")
        if name == "triton" and not available(probe):
            raise ValueError(
                f"decode_attention='triton' needs Triton, a CUDA device (or TRITON_INTERPRET=1 on CPU), fp16/bf16/fp32 and a "
                f"power-of-two head_dim >= 16; got {self.dtype} on {self.device}, head_dim={self.config.head_dim}"
            )
        return name

    def _resolve_decode(self, mode: str) -> str:
        if mode not in ("auto", *DECODE_MODES):
            raise ValueError(f"decode must be 'auto' or one of {DECODE_MODES}, got {mode!r}")
        graph_ok = self.device.type == "cuda" and self.decode_attention != "torch" and not self.offload_history
        if mode == "auto":
            return "graph" if graph_ok else "eager"
        if mode == "graph" and not graph_ok:
            raise ValueError(
                "decode='graph' needs a CUDA model, decode_attention 'triton' or 'sdpa' and no offload_history "
                f"(got {self.device}, decode_attention={self.decode_attention!r}, offload_history={self.offload_history})"
            )
        return mode

    def new_cache(self, batch_size: int, max_length: int) -> SegmentKVCache:
        """A cache for ``batch_size`` rows of up to ``max_length`` positions; on CUDA a batch that cannot fit stops here,
        before allocating, with one line naming the batch that fits (:class:`~segtrain.inference.memory.BatchTooLarge`)."""
        c = self.config
        if self.device.type == "cuda":
            from segtrain.inference.memory import check_batch_fits, device_free_bytes

            check_batch_fits(c, batch_size, max_length, device_free_bytes(self.device), weights_on_device=True, dtype=self.dtype,
                             prefill_chunk=self.prefill_chunk, offload_history=self.offload_history)  # fmt: skip
        return SegmentKVCache(
            self.model.policies,
            batch_size=batch_size,
            max_length=max_length,
            segment_size=c.segment_size,
            num_heads=c.num_heads,
            head_dim=c.head_dim,
            dtype=self.dtype,
            device=self.device,
            offload_history=self.offload_history,
            sdpa_prefill=self.sdpa_prefill,
            decode_attention=self.decode_attention,
            scale=attention_slots(self.model)[0][1].scale,
        )

    @contextlib.contextmanager
    def _reading(self, cache: SegmentKVCache) -> Iterator[None]:
        """The layers' attention reads ``cache`` inside the block (and does not keep it alive after)."""
        for attention in self._attention:
            attention.cache = cache
        try:
            yield
        finally:
            for attention in self._attention:
                attention.cache = None

    def run_layers(self, cache: SegmentKVCache, tokens: Tensor, positions: Tensor, steps: list[Callable] | None = None) -> Tensor:
        """``tokens [B, T]`` at ``positions [B, T]`` through every layer step (``steps``: compiled ones), attention over
        ``cache`` (its block or decoding step begun); returns the pre-norm hidden states ``[B, T, H]``."""
        x, rope = self.model.embed(tokens, positions)
        with self._reading(cache):
            for i, step in enumerate(steps or self.model.layer_steps()):
                cache.prefetch(i + 1)
                x = step(x, rope, self._attention[i])
        return x

    @torch.inference_mode()
    def step(self, cache: SegmentKVCache, tokens: Tensor, block: Block) -> Tensor:
        """Run one block of new tokens ``[B, width]`` through every layer; returns pre-norm hidden ``[B, width, H]``."""
        cache.begin_block(block)
        return self.run_layers(cache, tokens.to(self.device), block.positions(self.device).clamp(min=0))

    def decoder_layers(self) -> list[Callable]:
        """The layer steps the decoding step runs: compiled ones when ``compile_decode`` says so (made once)."""
        steps = self.model.layer_steps()
        if self.compile_backend is None:
            return steps
        if self._compiled is None:
            self._compiled = [torch.compile(step, backend=self.compile_backend, dynamic=False) for step in steps]
        return self._compiled

    def decoder(self, cache: SegmentKVCache, positions: Tensor, graph: bool | None = None) -> Decoder:
        """A decoding step over ``cache`` whose rows continue at ``positions [B]``; ``graph`` (default: ``decode ==
        "graph"``) captures it as a CUDA graph."""
        return Decoder(self, cache, positions, self.decode == "graph" if graph is None else graph)

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
        on_tokens: Callable[[list[int | None]], None] | None = None,
    ) -> GenerationOutput:
        """Greedy (``temperature=0``) or nucleus-sampled continuation of a batch of prompts.

        ``on_tokens(step_tokens)`` is called as each step's tokens reach the host (``None`` for a row
        that has stopped): streaming. The device runs one step ahead of the host, so a row that stops
        costs at most one extra step.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        cache = self.new_cache(B, max(lengths) + max_new_tokens)
        t0 = time.perf_counter()
        logits = self.prefill(cache, prompts)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        token = sample_next(logits, temperature, top_p, generator)
        positions = torch.tensor(lengths, device=self.device)
        _sync(self.device)
        t_setup = time.perf_counter()
        # capturing costs a few warm-up steps: with decode="auto", short generations decode without the graph
        graph = self.decode == "graph" and (self._decode_chosen or max_new_tokens >= GRAPH_MIN_NEW_TOKENS)
        decoder = self.decoder(cache, positions, graph) if max_new_tokens > 1 else None
        _sync(self.device)
        t_decode = time.perf_counter()
        rows = _Rows(B, stop_tokens, max_new_tokens)
        step_logits: list[Tensor] = []
        reader = _HostTokens(self.device)
        steps = 0
        for step in range(max_new_tokens):
            reader.push(token)
            if return_logits:
                step_logits.append(logits.clone())
            if step + 1 < max_new_tokens:  # queue the next step before waiting for this one's tokens
                logits = decoder(token, positions)
                positions += 1
                token = sample_next(logits, temperature, top_p, generator)
                steps += 1
            shown = rows.take(reader.pop())
            if on_tokens is not None:
                on_tokens(shown)
            if not any(rows.active):
                break
        decode_s = time.perf_counter() - t_decode
        return GenerationOutput(
            rows.tokens,
            rows.reasons,
            cache.memory_bytes(),
            cache.offloaded_bytes(),
            [x.cpu() for x in step_logits],
            prefill_s=t_setup - t0,
            setup_s=t_decode - t_setup,
            decode_s=decode_s,
            decode_steps=steps,
        )


class Decoder:
    """One decoding step with fixed shapes: ``decoder(tokens [B], positions [B]) -> logits [B, V]``.

    The step stores each row's new K/V at its position and attends; on CUDA (``decode="graph"``) it
    is captured once as a CUDA graph over static input buffers and replayed: no per-token host work
    beyond the replay. The returned logits live in a static buffer: use them before the next call.
    Building one warms the step up at ``positions`` (harmless: the first real step rewrites those
    slots before reading them).
    """

    def __init__(self, engine: SegmentedEngine, cache: SegmentKVCache, positions: Tensor, graph: bool):
        self.engine, self.cache = engine, cache
        self.tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=engine.device)
        self.positions = positions.detach().clone().to(engine.device)
        self.layers = engine.decoder_layers()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        if graph:
            if engine.decode != "graph":
                raise ValueError(f"a CUDA graph needs an engine with decode='graph' (this one: {engine.decode!r})")
            self._capture()
        elif engine.compile_backend is not None:
            self._warm_up(1)

    def _forward(self) -> Tensor:
        cache = self.cache
        if cache.offload_history:  # host positions for the history transfers (eager only)
            cache.begin_block(Block(tuple(self.positions.tolist()), (1,) * cache.batch_size))
        else:
            cache.begin_decode(self.positions)
        hidden = self.engine.run_layers(cache, self.tokens[:, None], self.positions[:, None], self.layers)
        return self.engine.model.logits(hidden[:, 0])

    def _warm_up(self, steps: int) -> None:
        """Run the step (compiling layers, tuning kernels); a compile that fails falls back to the plain layers."""
        try:
            for _ in range(steps):
                self._forward()
        except Exception as e:  # any compiler error: decode without it rather than not at all
            self._without_compile(e)
            for _ in range(steps):
                self._forward()

    def _without_compile(self, error: Exception) -> None:
        if self.engine.compile_backend is None:
            raise error
        message = f"torch.compile of the decoder layers failed ({type(error).__name__}: {error}); decoding without it"
        warnings.warn(message, stacklevel=4)
        self.engine.compile_backend, self.engine._compiled = None, None
        self.layers = self.engine.decoder_layers()

    def _capture(self) -> None:
        device = self.engine.device
        for attempt in range(2):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._warm_up(2)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    self.logits = self._forward()
                return
            except Exception as e:  # compiled code that cannot be captured: capture the plain layers
                self.graph = None
                if attempt:
                    raise
                self._without_compile(e)

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


class _Rows:
    """Each row's new tokens, and whether (and why) it stopped: at a stop token or after ``max_new_tokens``."""

    def __init__(self, batch_size: int, stop_tokens: Sequence[int], max_new_tokens: int):
        self.stop, self.max_new_tokens = {int(t) for t in stop_tokens}, max_new_tokens
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.reasons = ["length"] * batch_size
        self.active = [True] * batch_size

    def take(self, chosen: Tensor) -> list[int | None]:
        """Add one step's tokens ``[B]`` (host); returns what each row shows (None: it has stopped)."""
        shown: list[int | None] = [None] * len(self.tokens)
        for row, t in enumerate(chosen.tolist()):
            if not self.active[row]:
                continue
            if t in self.stop:
                self.active[row], self.reasons[row] = False, "stop"
                continue
            self.tokens[row].append(t)
            shown[row] = t
            if len(self.tokens[row]) >= self.max_new_tokens:
                self.active[row] = False
        return shown


class _HostTokens:
    """Each step's tokens copied to the host without stopping the device: a pinned buffer and an event per step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[Tensor, torch.cuda.Event | None]] = []

    def push(self, token: Tensor) -> None:
        if not self.cuda:
            self.pending.append((token.clone(), None))
            return
        host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
        host.copy_(token, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event))

    def pop(self) -> Tensor:
        host, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()
        return host


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
