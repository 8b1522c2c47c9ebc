"""Segment attention in plain transformers: the modeling file of every ``segtrain convert --to hf`` export.

An export carries this file as ``modeling_segtrain.py``; its ``config.json`` names it in ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` runs the model with the execution it was
trained with (DESIGN.md §1), and serving it needs torch and transformers only, not segtrain. Without
``trust_remote_code=True`` transformers refuses the custom ``model_type`` and asks for it: never full attention.

- :class:`SegtrainLlamaForCausalLM` subclasses transformers' Llama, so the weights keep Llama's names. Its forward
  feeds the input block by block (at most one segment and ``PREFILL_CHUNK`` tokens, per row by the row's own
  positions): no ``T x T`` mask, and prefill holds one block's activations plus the cache.
- Every layer's attention goes through transformers' ``AttentionInterface`` (``ATTENTION_NAME``), which reads the
  layer's per-KV-head policy from ``config.segtrain`` and attends over :class:`SegmentCache`.
- :class:`SegmentCache` (a transformers ``Cache``) keeps, per layer and run of KV heads with one policy, exactly the
  keys a future query can read: the previous and current segment, plus the policy's history (sinks, window, all).
  ``generate()`` makes one by itself; ``model(...)`` uses a temporary one when no cache is asked for.
- Left padding through ``attention_mask`` (segments follow each row's own positions), ``position_ids``, greedy and
  sampled ``generate()``, beam search, pipelines, ``labels`` (the loss; with gradients, history K/V is read detached
  and the carried segment is not, as in training).

Self-containment makes two things exist twice. segtrain's ``policy.py`` is the owner of both; the copies here are
:class:`HeadPolicy` (the grammar ``none | all | sink:N | window:W`` joined by ``+``) and :func:`kept_layout` /
:func:`visible` (which keys a query at position ``t`` reads). ``tests/test_hf_modeling.py`` checks them against
segtrain's policy module and its float64 reference attention. The RMSNorm keeps float64 in float64 (transformers'
rounds to float32), so float64 checks are exact; in 16- and 32-bit it computes what Llama's does.

Checked against transformers 5.17 and 5.25: they name the cache argument differently (``past_key_values`` and
``cache``); ``CACHE_ARG`` reads the name from transformers' own output class. No ``from __future__ import
annotations``: transformers reads ``config_class`` from the ``config`` annotation, which must stay a class.
"""

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface, LlamaConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm

ATTENTION_NAME = "segtrain_segment"
MODEL_TYPE = "segtrain_llama"
PREFILL_CHUNK = 1024  # query tokens per block at most: bounds a block's activations (segtrain's engine uses the same)
# transformers 5.17 calls the cache ``past_key_values``, 5.25 ``cache`` (in model arguments and outputs alike)
CACHE_ARG = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"

__all__ = [
    "ATTENTION_NAME",
    "HeadPolicy",
    "SegmentCache",
    "SegtrainLlamaConfig",
    "SegtrainLlamaForCausalLM",
    "SegtrainLlamaModel",
    "kept_layout",
    "visible",
]


# ---- the semantics, written a second time (segtrain.policy owns them) -----------------------------------------------

_TOKEN = re.compile(r"^(sink|window):(\d+)$")


@dataclasses.dataclass(frozen=True)
class HeadPolicy:
    """History one KV head reads: ``all`` of it, the first ``sink`` keys, the ``window`` keys before the previous segment."""

    all: bool = False
    sink: int = 0
    window: int = 0

    @classmethod
    def parse(cls, text: str) -> "HeadPolicy":
        if not isinstance(text, str):
            raise ValueError(f"a history policy is a string, got {text!r}")
        if text.strip() == "none":
            return cls()
        parts: dict[str, int] = {}
        for token in (t.strip() for t in text.split("+")):
            m = _TOKEN.match(token)
            kind, value = ("all", 1) if token == "all" else (m.group(1), int(m.group(2))) if m else (None, 0)
            if kind is None or value < 1 or kind in parts:
                raise ValueError(f"bad history policy {text!r}: expected 'none', 'all', 'sink:N' or 'window:W' joined by '+'")
            parts[kind] = value
        if "all" in parts:
            return cls(all=True)
        return cls(sink=parts.get("sink", 0), window=parts.get("window", 0))

    def __str__(self) -> str:
        if self.all:
            return "all"
        parts = ([f"sink:{self.sink}"] if self.sink else []) + ([f"window:{self.window}"] if self.window else [])
        return "+".join(parts) or "none"


def history_end(position: int, segment_size: int) -> int:
    """Keys before this one are history for a query at ``position``: the start of its previous segment."""
    return max(0, (position // segment_size - 1) * segment_size)


def kept_layout(policy: HeadPolicy, last: int, segment_size: int) -> tuple[int, int]:
    """``(a, lo)``: of positions ``0..last``, a query at ``last + 1`` (and so any later one) can read ``[0, a)`` and
    ``[lo, last]`` and nothing else: the sinks, then the window, the previous and the current segment."""
    end = history_end(last + 1, segment_size)
    if policy.all or last < 0:
        return 0, 0
    lo = max(0, end - policy.window) if policy.window else end
    a = min(policy.sink, end)
    return (0, 0) if a >= lo else (a, lo)


def visible(policy: HeadPolicy, query: torch.Tensor, key: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Whether a query at position ``query`` reads the key at ``key`` (both broadcast; -1 marks padding)."""
    end = ((torch.div(query, segment_size, rounding_mode="floor") - 1).clamp(min=0)) * segment_size
    history = (key < policy.sink) | (key >= end - policy.window) if not policy.all else torch.ones_like(key, dtype=torch.bool)
    return (query >= 0) & (key >= 0) & (key <= query) & ((key >= end) | history)


# ---- configuration ----------------------------------------------------------------------------------------------------


class SegtrainLlamaConfig(LlamaConfig):
    """Llama's configuration plus segtrain's execution under ``segtrain``: ``segment_size`` and ``history_policy`` (one
    list per layer, one policy string per KV head; a single string means every head)."""

    model_type = MODEL_TYPE

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if getattr(self, "segtrain", None) is not None:  # a bare SegtrainLlamaConfig() (transformers makes some) has none
            self.segment_policies()

    def segment_policies(self) -> tuple[int, list[list[HeadPolicy]]]:
        """``(segment_size, policy per layer and KV head)``; a missing or malformed entry raises naming the field."""
        spec = getattr(self, "segtrain", None)
        where = "config.json: segtrain"
        if not isinstance(spec, dict) or "segment_size" not in spec or "history_policy" not in spec:
            raise ValueError(f"{where}: needs a mapping with segment_size and history_policy (a segtrain export writes it)")
        size = spec["segment_size"]
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{where}.segment_size: expected a positive integer, got {size!r}")
        table = spec["history_policy"]
        layers, heads = self.num_hidden_layers, self.num_key_value_heads
        rows = [table] * layers if isinstance(table, str) else table
        if not isinstance(rows, list) or len(rows) != layers:
            raise ValueError(f"{where}.history_policy: expected one entry per layer ({layers}), got {table!r}")
        parsed = []
        for i, row in enumerate(rows):
            row = [row] * heads if isinstance(row, str) else row
            if not isinstance(row, list) or len(row) != heads:
                raise ValueError(f"{where}.history_policy[{i}]: expected one policy per KV head ({heads}), got {row!r}")
            try:
                parsed.append([HeadPolicy.parse(p) for p in row])
            except ValueError as e:
                raise ValueError(f"{where}.history_policy[{i}]: {e}") from None
        return size, parsed


# ---- the cache --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Group:
    """KV heads of one layer that share a policy: their keys and values ``[B, heads, width, D]`` in the policy's layout."""

    policy: HeadPolicy
    kv_heads: list[int]
    q_heads: list[int]
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def __post_init__(self):
        self.kv_index, self.q_index = _as_index(self.kv_heads), _as_index(self.q_heads)


def _as_index(heads: list[int]) -> slice | list[int]:
    """Adjacent heads as a slice: a view, no copy."""
    return slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else heads


class SegmentCacheLayer(CacheLayerMixin):
    """One layer of :class:`SegmentCache`: its KV heads grouped by policy. Filled by the segment attention only."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, policies: list[HeadPolicy], query_group: int):
        super().__init__()
        self.groups = []
        for policy in dict.fromkeys(policies):
            heads = [h for h, p in enumerate(policies) if p == policy]
            self.groups.append(_Group(policy, heads, [h * query_group + i for h in heads for i in range(query_group)]))
        self.seen = 0

    def lazy_initialization(self, key_states, value_states=None) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("a SegmentCache is filled by segment attention (SegtrainLlamaForCausalLM), not by update()")

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        raise NotImplementedError("segment attention builds its own masks")

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a SegmentCache cannot be cropped: it has already dropped what no later query reads")

    def reset(self) -> None:
        for g in self.groups:
            g.keys = g.values = None
        self.seen = 0


@dataclasses.dataclass
class _Plan:
    """How one block attends and what a policy's rows keep after it (the same for every layer)."""

    fast: bool  # every row with tokens starts at the same position and holds no padding: lower-right causal, no mask
    mask: torch.Tensor | None  # [B, 1, n, keys] otherwise
    history: torch.Tensor | None  # [B, 1, keys, 1]: keys read detached (only when gradients are recorded)
    keep: list[slice] | torch.Tensor  # columns of [cache, block] that stay: slices, or [B, width] indices


class SegmentCache(Cache):
    """KV cache per (layer, KV head) holding exactly what the policy lets later queries read (DESIGN.md §1).

    Row ``r`` of a policy's keys holds positions ``[0, a) + [lo, last]`` (:func:`kept_layout`) in order, from
    column 0; shorter rows end in padding. Each block appends its keys and drops, per row, the keys no later query
    reads, so a ``none`` head holds at most two segments and ``sink:N+window:W`` ``N + W + 2S`` keys whatever the
    length. Positions and layouts are bookkept on the host; every layer reuses one block's plan.
    """

    def __init__(self, config: SegtrainLlamaConfig):
        self.segment_size, table = config.segment_policies()
        group = config.num_attention_heads // config.num_key_value_heads
        super().__init__(layers=[SegmentCacheLayer(row, group) for row in table])
        self.policies = list(dict.fromkeys(p for row in table for p in row))
        self.last: list[int] = []  # per row: last position stored (-1: none yet)
        self.layout: dict[HeadPolicy, list[tuple[int, int]]] = {}  # per policy and row: (a, lo) of kept_layout
        self.width: dict[HeadPolicy, int] = {}  # per policy: columns of its key tensors
        self._plans: dict[HeadPolicy, _Plan] | None = None  # the block being run

    # -- inspection ---------------------------------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns seen so far (padding included), as transformers counts a cache's length."""
        return self.layers[layer_idx].seen if self.layers else 0

    def positions(self, policy: HeadPolicy, device=None) -> torch.Tensor:
        """``[B, width]``: the position each column of ``policy``'s keys holds (-1: padding)."""
        width = self.width.get(policy, 0)
        if not self.last:
            return torch.zeros(0, width, dtype=torch.long, device=device)
        a, lo = (torch.tensor(x, device=device)[:, None] for x in zip(*self.layout[policy]))
        last = torch.tensor(self.last, device=device)[:, None]
        j = torch.arange(width, device=device)[None]
        p = torch.where(j < a, j, lo + j - a)
        return torch.where(p <= last, p, -1)

    def held(self, layer: int, kv_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions [B, width], keys, values [B, width, D])`` that (layer, KV head) holds (tests, inspection)."""
        for g in self.layers[layer].groups:
            if kv_head in g.kv_heads:
                i = g.kv_heads.index(kv_head)
                return self.positions(g.policy, g.keys.device), g.keys[:, i], g.values[:, i]
        raise IndexError(f"layer {layer} has no KV head {kv_head}")

    def memory_bytes(self) -> int:
        """Device bytes the keys and values keep alive: a row's kept keys are a view of the buffer its last block made,
        so keys dropped by that block stay until the next one (at most one segment's worth per policy and layer: the
        block's buffer holds the previous and the current segment)."""
        storages = {}
        for layer in self.layers:
            for t in (t for g in layer.groups for t in (g.keys, g.values) if t is not None):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    # -- blocks -------------------------------------------------------------------------------------------------------

    def begin_block(self, starts: list[int], counts: list[int], device, record_grad: bool) -> None:
        """Plan a block: row ``r`` brings positions ``starts[r] .. starts[r] + counts[r] - 1`` (0 tokens: it sits out)."""
        if not self.last:
            self.last = [-1] * len(starts)
            self.layout = {p: [(0, 0)] * len(starts) for p in self.policies}
            self.width = dict.fromkeys(self.policies, 0)
        if len(starts) != len(self.last):
            raise ValueError(f"the cache holds {len(self.last)} rows, the input has {len(starts)}")
        S, n = self.segment_size, max(counts)
        for row, (start, count) in enumerate(zip(starts, counts)):
            if count and start != self.last[row] + 1:
                raise ValueError(
                    f"row {row}: its tokens start at position {start}, the cache holds positions up to {self.last[row]}; "
                    "pass the attention_mask of the whole sequence so far (or position_ids that continue it)"
                )
        active = [r for r, c in enumerate(counts) if c]
        lasts = [s + c - 1 if c else self.last[r] for r, (s, c) in enumerate(zip(starts, counts))]
        segments = {starts[r] // S for r in active} | {lasts[r] // S for r in active}
        aligned = len({starts[r] for r in active}) == 1 and len(segments) == 1  # one segment of every row: no mask
        q_pos = None  # [B, n] positions of the block's queries (-1: padding), made when a policy needs them
        plans = {}
        for policy in self.policies:
            old, width = self.layout[policy], self.width[policy]
            new = [kept_layout(policy, last, S) if c else lay for last, c, lay in zip(lasts, counts, old)]
            rows_full = all(_kept_count(old[r], self.last[r]) == width for r in active)
            fast = aligned and rows_full
            mask = history = None
            if not fast or record_grad:
                if q_pos is None:
                    q_pos = torch.tensor([[s + i if i < c else -1 for i in range(n)] for s, c in zip(starts, counts)])
                    q_pos = q_pos.to(device)
                k_pos = torch.cat([self.positions(policy, device), q_pos], 1)
            if not fast:
                mask = visible(policy, q_pos[:, :, None], k_pos[:, None, :], S)
                mask |= ~mask.any(-1, keepdim=True)  # a padding query reads anything rather than nothing (no NaN)
                mask = mask[:, None]
            if record_grad:
                if not aligned:
                    raise ValueError("gradients through a block whose rows are at different positions are not supported")
                end = torch.tensor([history_end(s, S) for s in starts], device=device)[:, None]
                history = ((k_pos >= 0) & (k_pos < end))[:, None, :, None]
            keep = self._keep(old, new, counts, lasts, width, n, device)
            plans[policy] = _Plan(fast, mask, history, keep)
            self.layout[policy] = new
            self.width[policy] = max((_kept_count(lay, last) for lay, last in zip(new, lasts)), default=0)
        self.last = lasts
        self._plans = plans

    def _keep(self, old, new, counts, lasts, width, n, device) -> list[slice] | torch.Tensor:
        """Columns of ``[cache (width), block (n)]`` each row keeps, in its new layout: slices when every row is alike,
        else ``[B, new width]`` indices."""
        if len(set(zip(old, new, counts, self.last))) == 1:
            runs = _kept_runs(old[0], new[0], self.last[0], lasts[0], width)
            if runs is not None:
                return runs
        a_o, lo_o, a_n, lo_n = (torch.tensor(x, device=device)[:, None] for x in zip(*[(*o, *w) for o, w in zip(old, new)]))
        last_o = torch.tensor(self.last, device=device)[:, None]
        last_n = torch.tensor(lasts, device=device)[:, None]
        j = torch.arange(max((_kept_count(w, last) for w, last in zip(new, lasts)), default=0), device=device)[None]
        p = torch.where(j < a_n, j, lo_n + j - a_n)
        col = torch.where(p > last_o, width + p - last_o - 1, torch.where(p < a_o, p, a_o + p - lo_o))
        return torch.where(p <= last_n, col, 0).clamp(max=width + n - 1)

    def end_forward(self, columns: int) -> None:
        """The forward's blocks are done: ``columns`` more input columns seen (what get_seq_length counts)."""
        self._plans = None
        for layer in self.layers:
            layer.seen += columns

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """Store the block's ``key, value [B, Hkv, n, D]`` in ``layer`` and attend ``query [B, Hq, n, D]``; ``[B, Hq, n, D]``."""
        if self._plans is None:
            raise RuntimeError("segment attention runs inside SegtrainLlamaModel.forward (no block was planned)")
        plans = self._plans
        B, _, n, D = query.shape
        groups = self.layers[layer].groups
        out = query if len(groups) == 1 else torch.empty_like(query)
        for g in groups:
            plan = plans[g.policy]
            k_new, v_new = key[:, g.kv_index], value[:, g.kv_index]
            k = k_new if g.keys is None else torch.cat([g.keys, k_new], 2)
            v = v_new if g.values is None else torch.cat([g.values, v_new], 2)
            k_read, v_read = k, v
            if plan.history is not None:  # history is read detached (DESIGN.md §1); the carried segment is not
                k_read, v_read = torch.where(plan.history, k.detach(), k), torch.where(plan.history, v.detach(), v)
            q = query[:, g.q_index]
            if plan.fast:
                bias = causal_lower_right(n, k.shape[2]) if n > 1 else None
                gqa = len(g.q_heads) > len(g.kv_heads)
                o = F.scaled_dot_product_attention(q, k_read, v_read, attn_mask=bias, scale=scale, enable_gqa=gqa)
            else:  # one mask per policy: fold each KV head's query heads into the query axis
                h, G = len(g.kv_heads), len(g.q_heads) // len(g.kv_heads)
                mask = plan.mask[:, :, None].expand(-1, -1, G, -1, -1).reshape(B, 1, G * n, -1)
                o = F.scaled_dot_product_attention(q.reshape(B, h, G * n, D), k_read, v_read, attn_mask=mask, scale=scale)
                o = o.reshape(B, h * G, n, D)
            if len(groups) == 1:
                out = o
            else:
                out[:, g.q_index] = o
            g.keys, g.values = _columns(k, plan.keep), _columns(v, plan.keep)
        return out

    # -- batch edits (beam search, generate's expansions) ------------------------------------------------------------

    def _select_rows(self, index: torch.Tensor) -> None:
        rows = index.tolist()
        for layer in self.layers:
            for g in layer.groups:
                if g.keys is not None:
                    g.keys, g.values = g.keys[index.to(g.keys.device)], g.values[index.to(g.values.device)]
        self.last = [self.last[r] for r in rows]
        self.layout = {p: [lay[r] for r in rows] for p, lay in self.layout.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.last:
            self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.last:
            self._select_rows(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.last:
            self._select_rows(torch.arange(len(self.last)).repeat_interleave(repeats))

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.last, self.layout, self.width, self._plans = [], {}, {}, None


def _kept_count(layout: tuple[int, int], last: int) -> int:
    a, lo = layout
    return a + last - lo + 1 if last >= 0 else 0


def _kept_runs(old: tuple[int, int], new: tuple[int, int], last_old: int, last_new: int, width: int) -> list[slice] | None:
    """The columns a row keeps as slices of ``[cache, block]``, when they are at most two runs (the usual case)."""
    (a0, lo0), (a1, lo1) = old, new

    def column(p: int) -> int:
        return p if p < a0 else a0 + p - lo0 if p <= last_old else width + p - last_old - 1

    c = column(lo1)
    local = slice(c, c + last_new - lo1 + 1)
    if a1 == 0:
        return [local]
    if a1 <= a0 or lo0 == a0:  # the sinks sit in columns [0, a1)
        return [slice(0, a1 + last_new - lo1 + 1)] if c == a1 else [slice(0, a1), local]
    return None


def _columns(t: torch.Tensor, keep: list[slice] | torch.Tensor) -> torch.Tensor:
    if isinstance(keep, list):
        return t[:, :, keep[0]] if len(keep) == 1 else torch.cat([t[:, :, k] for k in keep], 2)
    return t.gather(2, keep[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


def segment_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: ``query [B, Hq, n, D]``, ``key, value [B, Hkv, n, D]`` of the block ->
    ``([B, n, Hq, D], None)``. The cache comes as the ``segment_cache`` keyword from :class:`SegtrainLlamaModel`."""
    cache = kwargs.get("segment_cache")
    if cache is None:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} runs inside SegtrainLlamaModel.forward only")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, key, value, scale).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, segment_attention_forward)


# ---- the model --------------------------------------------------------------------------------------------------------


class SegtrainRMSNorm(LlamaRMSNorm):
    """Llama's RMSNorm, computed in at least float32: float64 stays float64 (the same as Llama's in 16- and 32-bit)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class _SegmentAttentionOnly:
    """Every model class here runs segment attention and nothing else: another attention would change the model."""

    config_class = SegtrainLlamaConfig
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False
    _supports_attention_backend = False  # servers' Transformers backends would swap in full or sliding attention
    _can_compile_fullgraph = False

    def _check_and_adjust_attn_implementation(self, attn_implementation=None, *args, **kwargs) -> str:
        if attn_implementation not in (None, ATTENTION_NAME):
            raise ValueError(
                f"attn_implementation={attn_implementation!r}: this model runs segment attention ({ATTENTION_NAME!r}), the "
                "execution it was trained with; another attention implementation would change its outputs"
            )
        return ATTENTION_NAME


class SegtrainLlamaModel(_SegmentAttentionOnly, LlamaModel):
    """Llama's decoder run block by block over :class:`SegmentCache` (see the module docstring)."""

    config: SegtrainLlamaConfig

    def __init__(self, config: SegtrainLlamaConfig):
        super().__init__(config)
        self.segment_size = config.segment_policies()[0]
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if type(child) is LlamaRMSNorm:
                    setattr(module, name, SegtrainRMSNorm(child.weight.shape[0], eps=child.variance_epsilon))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Llama's arguments. ``attention_mask`` is a 2-D padding mask over the whole sequence so far (1: token); a row's
        tokens must be one run, at positions that count up by one. Returns the final hidden states of the last
        ``logits_to_keep`` columns (0: all; padding columns are 0)."""
        cache = kwargs.pop("cache", None)
        cache = past_key_values if cache is None else cache
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(unsupported, None):
                raise ValueError(f"{unsupported}=True is not supported by segment attention's block-wise forward")
        if self.config._attn_implementation != ATTENTION_NAME:  # set after loading: refused, or unset: ours (not eager)
            self.config._attn_implementation = self._check_and_adjust_attn_implementation(self.config._attn_implementation)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds
        B, n = tokens.shape[:2]
        device = tokens.device
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None:
            cache = SegmentCache(self.config)
        elif not isinstance(cache, SegmentCache):
            raise ValueError(
                f"{type(cache).__name__}: this model keeps a SegmentCache (generate() makes one, so does use_cache=True)"
            )
        first, counts, starts = self._rows(attention_mask, position_ids, cache, B, n, device)
        keep = n if not isinstance(logits_to_keep, int) or logits_to_keep <= 0 else min(logits_to_keep, n)
        hidden = None
        record_grad = torch.is_grad_enabled()
        for u, v in self._blocks(counts, starts):
            block = [max(0, min(c, v) - u) for c in counts]
            width = max(block)
            offs = torch.arange(width, device=device)
            index = torch.tensor(first, device=device)[:, None] + u + offs
            real = offs[None] < torch.tensor(block, device=device)[:, None]
            index = torch.where(real, index, 0)
            if input_ids is not None:
                x = self.embed_tokens(input_ids.gather(1, index))
            else:
                x = inputs_embeds.gather(1, index[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
            positions = torch.where(real, torch.tensor(starts, device=device)[:, None] + u + offs, 0)
            rope = self.rotary_emb(x, positions)
            cache.begin_block([s + u for s in starts], block, device, record_grad)
            for layer in self.layers[: self.config.num_hidden_layers]:
                x = layer(x, position_embeddings=rope, position_ids=positions, segment_cache=cache, **kwargs)
            x = self.norm(x)
            if hidden is None:
                hidden = x.new_zeros(B, keep, x.shape[-1])
            target = index - (n - keep)
            take = real & (target >= 0)
            hidden[take.nonzero(as_tuple=True)[0], target[take]] = x[take]
        cache.end_forward(n)
        if hidden is None:  # no token at all (every column padding)
            hidden = self.embed_tokens.weight.new_zeros(B, keep, self.config.hidden_size)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_ARG: cache if use_cache else None})

    def _rows(self, attention_mask, position_ids, cache: SegmentCache, B: int, n: int, device):
        """Per row: index of its first token in the input, number of tokens, position of the first; checked."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask: give the 2-D padding mask [batch, length] (segment attention builds its own masks)")
        valid = attention_mask[:, -n:].bool() if attention_mask is not None else torch.ones(B, n, dtype=torch.bool, device=device)
        if position_ids is not None:
            positions = position_ids[..., -n:].expand(B, n).to(device)
        elif attention_mask is not None:
            positions = attention_mask.long().cumsum(-1)[:, -n:] - 1
        else:
            after = torch.tensor(cache.last or [-1] * B, device=device)
            positions = after[:, None] + 1 + torch.arange(n, device=device)
        count = valid.sum(1)
        first = torch.where(count > 0, valid.int().argmax(1), 0)
        rel = torch.arange(n, device=device)[None] - first[:, None]
        one_run = (valid == ((rel >= 0) & (rel < count[:, None]))).all(1)
        start = positions.gather(1, first[:, None])[:, 0]
        counts_up = ((positions - start[:, None] == rel) | ~valid).all(1)
        stats = torch.stack([first, count, start, one_run.long(), counts_up.long()], 1).tolist()
        for row, (_, c, s, run, up) in enumerate(stats):
            if not run:
                raise ValueError(f"attention_mask row {row}: a row's tokens must be one run (padding only before or after them)")
            if c and not up:
                raise ValueError(f"position_ids row {row}: positions must count up by one (packed sequences are not supported)")
            if c and s < 0:
                raise ValueError(f"position_ids row {row}: negative position {s}")
        return [r[0] for r in stats], [r[1] for r in stats], [r[2] for r in stats]

    def _blocks(self, counts: list[int], starts: list[int]) -> list[tuple[int, int]]:
        """Blocks ``[u, v)`` of each row's tokens (counted from its first), at most ``PREFILL_CHUNK`` and ``S`` long. When the
        rows with tokens start at one position they are also cut at segment boundaries: a block then lies in one segment
        of every row, and attention needs no mask."""
        S, n = self.segment_size, max(counts, default=0)
        starts_active = {s for s, c in zip(starts, counts) if c}
        aligned = len(starts_active) == 1
        start = next(iter(starts_active)) if aligned else 0
        cuts, u = [], 0
        while u < n:
            v = min(n, u + min(S, PREFILL_CHUNK))
            if aligned:
                v = min(v, ((start + u) // S + 1) * S - start)
            cuts.append((u, v))
            u = v
        return cuts


class SegtrainLlamaForCausalLM(_SegmentAttentionOnly, LlamaForCausalLM):
    """Llama with an LM head, run with segment attention; ``generate()`` keeps a :class:`SegmentCache` by itself."""

    config: SegtrainLlamaConfig

    def __init__(self, config: SegtrainLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = SegtrainLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        return_dict = kwargs.pop("return_dict", None)
        cache = kwargs.pop("cache", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if cache is None else cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep if isinstance(logits_to_keep, int) and labels is None else 0,
            **{k: v for k, v in kwargs.items() if k != "num_items_in_batch"},
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_ARG: getattr(outputs, CACHE_ARG)})
        return out.to_tuple() if return_dict is False else out

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() keeps a :class:`SegmentCache`: where transformers made its default dynamic cache, use one instead."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        made = model_kwargs.get(CACHE_ARG)
        if type(made) is DynamicCache and not getattr(made, "_is_user_defined", False):
            model_kwargs[CACHE_ARG] = SegmentCache(self.config)
        return result


SegtrainLlamaConfig.register_for_auto_class()
SegtrainLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
