"""Portable Llama decoder (DESIGN.md §3): plain PyTorch, Hugging Face Llama parameter names.

Every attention is :func:`segtrain.attention.segment_attention` with the layer's per-KV-head
policies, called through the layer's one attention slot (``self_attn.core_attention``, a
:class:`~segtrain.attention.SegmentAttention`, the policy's one holder); RoPE uses absolute positions.
Context parallelism fills that slot (:func:`segtrain.attention.fill_slots`); the inference engine runs
each layer as one step with its KV cache in the slot's place (:meth:`LlamaForCausalLM.layer_steps`),
so it runs these same modules segment by segment. The model knows nothing of parallelism or training loops.

Numerics follow ``transformers``' Llama (RMSNorm in float32, RoPE angles in float32, llama3 RoPE
scaling computed the same way), so an HF state dict gives the same logits when every head reads
all history and one segment covers the sequence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from segtrain.attention import Documents, SegmentAttention, attention_slots
from segtrain.config import ModelConfig
from segtrain.loss import IGNORE_INDEX, mean_loss
from segtrain.models.fused_loss import weighted_cross_entropy
from segtrain.policy import PolicyTable

__all__ = [
    "Attention",
    "DecoderLayer",
    "LlamaForCausalLM",
    "LlamaModel",
    "MLP",
    "RMSNorm",
    "apply_rope",
    "rope_cos_sin",
    "rope_inv_freq",
]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # float32 like HF; float64 stays float64
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse RoPE frequencies (float32, CPU), with llama3 scaling exactly as ``transformers`` computes it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_context = rs["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin [..., T, D]`` for integer ``positions [..., T]``: angles in float32, then cast (as HF does)."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x [B, H, T, D]``; ``cos, sin [B|1, T, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.qkv_weight: Tensor | None = None  # q|k|v rows in one tensor (LlamaForCausalLM.fuse_projections)
        self.core_attention = SegmentAttention(
            segment_size=config.segment_size,
            policy=config.policy_table()[layer],
            n_kv_heads=config.num_kv_heads,
            backend=config.attention_backend,
            carry_grad=config.carry_grad,
            layer=layer,
        )

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` with RoPE applied: what the attention slot reads."""
        B, T, _ = x.shape
        if self.qkv_weight is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv = self.num_kv_heads * self.head_dim
            q, k, v = fused_linear(x, self.qkv_weight, self.q_proj.weight).split([self.num_heads * self.head_dim, kv, kv], -1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def output(self, out: Tensor) -> Tensor:
        """The output projection of the slot's ``out [B, Hq, T, D]``."""
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], documents: Documents | None = None) -> Tensor:
        return self.output(call_slot(self.core_attention, self.project(x, rope), documents))


def call_slot(slot: nn.Module, qkv: tuple[Tensor, Tensor, Tensor], documents: Documents | None) -> Tensor:
    """The attention slot on ``q, k, v``; ``documents`` only in document mode (slots that never see packed documents,
    like the inference engine's, keep the three-argument call)."""
    return slot(*qkv) if documents is None else slot(*qkv, documents=documents)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_weight: Tensor | None = None  # gate|up rows in one tensor (LlamaForCausalLM.fuse_projections)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_weight is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = fused_linear(x, self.gate_up_weight, self.gate_proj.weight).chunk(2, -1)
        hidden = F.silu(gate).mul_(up)  # in place: at most three [.., intermediate] alive, as unfused
        del gate, up  # the fused output goes before down's output comes, as the unfused gate and up do
        return self.down_proj(hidden)


def fuse_weights(linears: list[nn.Linear]) -> Tensor:
    """The ``linears``' weights stacked by output row in one new tensor; each weight becomes a view of its rows, so the
    old storage is freed and the weights exist once (their parameters, names and values stay). Weights that already lie
    back to back in one storage (a model loaded with ``assign=True`` from a fused one's state dict) are not copied."""
    weights = [m.weight.detach() for m in linears]
    if _back_to_back(weights):
        return weights[0].as_strided((sum(w.shape[0] for w in weights), weights[0].shape[1]), weights[0].stride())
    fused = torch.cat(weights)
    for m, rows in zip(linears, fused.split([m.weight.shape[0] for m in linears]), strict=True):
        m.weight.data = rows
    return fused


def _back_to_back(weights: list[Tensor]) -> bool:
    first, offset = weights[0], weights[0].storage_offset()
    for w in weights:
        same = w.device == first.device and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if w.is_meta or not (same and w.is_contiguous() and w.dtype == first.dtype and w.storage_offset() == offset):
            return False
        offset += w.numel()
    return True


def fused_linear(x: Tensor, fused: Tensor, weight: Tensor) -> Tensor:
    """``x @ fused.T``: one GEMM for the projections whose weights (``weight`` one of them) are views of ``fused``.

    For inference only: the GEMM reads ``fused``, not the parameters, so no gradient would reach them."""
    if torch.is_grad_enabled() and weight.requires_grad:
        raise RuntimeError("fused projections are for inference (their weights get no gradient): call "
                           "model.unfuse_projections() before training, or run under torch.no_grad()")  # fmt: skip
    return F.linear(x, fused)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def before_attention(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Norm, projections and RoPE: the attention slot's inputs."""
        return self.self_attn.project(self.input_layernorm(x), rope)

    def after_attention(self, x: Tensor, out: Tensor) -> Tensor:
        """Output projection, residual, norm, MLP, residual."""
        x = x + self.self_attn.output(out)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], documents: Documents | None = None) -> Tensor:
        slot = self.self_attn.core_attention
        return self.step(x, rope, slot if documents is None else functools.partial(slot, documents=documents))

    def step(self, x: Tensor, rope: tuple[Tensor, Tensor], attention: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """The layer with ``attention(q, k, v)`` in its slot's place (the inference engine's KV cache).

        Three calls, so that the two around the attention can be compiled (segtrain.speed.compile) while the
        attention (segment attention, what CP puts in the slot, or the engine's cache) stays outside the graphs."""
        return self.after_attention(x, attention(*self.before_attention(x, rope)))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final norm (``model.*`` in HF names)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.inv_freq = rope_inv_freq(config)  # a plain attribute: model.to(dtype) must not round it

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.inv_freq.device != positions.device:  # moved once, not copied each call (a CUDA graph copies no host data)
            self.inv_freq = self.inv_freq.to(positions.device)
        return rope_cos_sin(self.inv_freq, positions, dtype)

    @property
    def policies(self) -> PolicyTable:
        """The history policy per (layer, KV head), as the layers' attention slots hold it (its one holder)."""
        return PolicyTable(tuple(slot.policy for _, slot in attention_slots(self)))

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Output of the last decoder layer, before the final norm: ``[B, T, hidden]``."""
        T = input_ids.shape[1]
        documents = None if position_ids is None else self.documents(position_ids, input_ids.shape[0])  # none: one document
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        x = self.embed_tokens(input_ids)
        rope = self.rope(position_ids if position_ids.dim() == 2 else position_ids[None], x.dtype)
        for layer in self.layers:
            x = layer(x, rope) if documents is None else layer(x, rope, documents)
        return x

    def documents(self, position_ids: Tensor, batch: int) -> Documents | None:
        """Document mode (``config.documents``): the packed documents ``position_ids`` mark, shared by every layer (also
        when each row is one document: the ranks of a context-parallel group must agree on the mode)."""
        if not self.config.documents:
            return None
        return Documents.from_position_ids(position_ids.expand(batch, -1) if position_ids.dim() == 1 else position_ids)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        return self.norm(self.hidden_states(input_ids, position_ids))


class LlamaForCausalLM(nn.Module):
    """Llama decoder with an LM head. HF parameter names, so ``load_state_dict(hf_model.state_dict())`` works.

    With ``tie_word_embeddings`` the head shares the embedding matrix; a state dict without
    ``lm_head.weight`` (how tied checkpoints are saved) loads too.
    """

    def __init__(self, config: ModelConfig, loss_chunk_size: int = 1024):
        super().__init__()
        self.config = config
        self.loss_chunk_size = loss_chunk_size
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._register_load_state_dict_pre_hook(self._fill_tied_head)
        self._chunk_grads = None  # the fused loss's chunk function; segtrain.speed.portable puts a compiled one here
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    def _fill_tied_head(self, state_dict, prefix, *args, **kwargs) -> None:
        head, embed = prefix + "lm_head.weight", prefix + "model.embed_tokens.weight"
        if self.config.tie_word_embeddings and head not in state_dict and embed in state_dict:
            state_dict[head] = state_dict[embed]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, ones for norms (as HF)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm and LM head on pre-norm hidden states ``[..., hidden]``."""
        return self.lm_head(self.model.norm(hidden))

    def forward(
        self,
        input_ids: Tensor,
        *,
        labels: Tensor | None = None,
        loss_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_positions: str | Tensor | None = None,
        reduction: str = "mean",
        loss_weights: Tensor | None = None,
    ) -> Tensor:
        """The parallel (training) form over whole sequences.

        Args:
            input_ids: ``[B, T]`` token ids at positions ``0..T-1``.
            labels: ``[B, T]`` target of each position, already shifted (``labels[:, t]`` is the token
                after ``input_ids[:, t]``); ``-100`` ignores a position. Given: returns the loss.
            loss_mask: ``[B, T]``, 0 ignores a position (multiplies the per-token loss).
            position_ids: ``[B, T]`` or ``[T]`` RoPE positions; default ``0..T-1``. Segments follow the index in
                the sequence; in document mode (``config.documents``) a 0 starts a document, whose segments follow
                its own positions and which sees no other document.
            logits_positions: without labels, which logits to return: None (all, ``[B, T, V]``),
                ``"last"`` (``[B, 1, V]``) or an index tensor ``[n]`` / ``[B, n]`` (``[B, n, V]``).
            reduction: with labels, ``"mean"`` (the loss, :func:`segtrain.loss.mean_loss`) or ``"none"``
                (the cross-entropy of every position, ``[B, T]``, for the training recipes' loss).
            loss_weights: with labels, ``[B, T]`` weights ``w``: returns ``sum(w x cross-entropy)`` with its gradients
                computed in the forward (:func:`~segtrain.models.fused_loss.weighted_cross_entropy`: the LM head is
                not recomputed in backward, which must then run once). ``loss_mask`` and ``reduction`` are ignored.

        Returns:
            The mean cross-entropy over unmasked positions (a scalar, float32 or float64) when ``labels`` is
            given, computed chunk by chunk so that full-vocabulary logits never exist for all
            positions at once; otherwise the requested logits.
        """
        hidden = self.model.hidden_states(input_ids, position_ids)
        if labels is not None:
            if loss_weights is not None:
                return self.weighted_loss(hidden, labels, loss_weights)
            if reduction == "none":
                return self.per_token_loss(hidden, labels)
            if reduction != "mean":
                raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
            return self.chunked_loss(hidden, labels, loss_mask)
        if logits_positions is None:
            return self.logits(hidden)
        if isinstance(logits_positions, str):
            if logits_positions != "last":
                raise ValueError(f"logits_positions must be None, 'last' or an index tensor, got {logits_positions!r}")
            return self.logits(hidden[:, -1:])
        index = torch.as_tensor(logits_positions, device=hidden.device)
        index = index.expand(hidden.shape[0], -1) if index.dim() == 1 else index
        return self.logits(hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])))

    def _chunk_ce(self, hidden: Tensor, labels: Tensor) -> Tensor:
        logits = self.logits(hidden).to(torch.promote_types(hidden.dtype, torch.float32))
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        return ce.view(labels.shape)

    def per_token_loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy ``[B, T]`` of pre-norm ``hidden [B, T, H]`` against ``labels [B, T]`` (0 where ignored).

        Norm, LM head and cross-entropy run on ``loss_chunk_size`` positions at a time, each chunk
        under activation checkpointing: forward and backward hold one chunk's logits at a time.
        """
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] = {tuple(hidden.shape[:2])}")
        seq_len, chunk = hidden.shape[1], max(1, self.loss_chunk_size)
        if seq_len <= chunk:
            return self._chunk_ce(hidden, labels)
        use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
        parts = []
        for a in range(0, seq_len, chunk):
            args = (hidden[:, a : a + chunk], labels[:, a : a + chunk])
            parts.append(checkpoint(self._chunk_ce, *args, use_reentrant=False) if use_checkpoint else self._chunk_ce(*args))
        return torch.cat(parts, dim=1)

    def weighted_loss(self, hidden: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """``sum(weights x cross-entropy)`` of pre-norm ``hidden [B, T, H]``, gradients computed in the forward."""
        norm = self.model.norm
        return weighted_cross_entropy(hidden, norm.weight, self.lm_head.weight, labels, weights, eps=norm.eps,
                                      chunk_size=max(1, self.loss_chunk_size), chunk_fn=self._chunk_grads)  # fmt: skip

    def chunked_loss(self, hidden: Tensor, labels: Tensor, loss_mask: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of pre-norm ``hidden [B, T, H]`` against ``labels [B, T]`` (:func:`segtrain.loss.mean_loss`)."""
        return mean_loss(self.per_token_loss(hidden, labels), labels, loss_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- serving: what the inference engine runs (segtrain.inference.engine) -----------------------

    @property
    def policies(self) -> PolicyTable:
        """The history policy per (layer, KV head): what a KV cache for this model keeps."""
        return self.model.policies

    def embed(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The first layer's input for ``tokens [B, T]`` at ``positions [B, T]``: embeddings and RoPE ``cos, sin``."""
        x = self.model.embed_tokens(tokens)
        return x, self.model.rope(positions, x.dtype)

    def layer_steps(self) -> list[Callable[[Tensor, tuple[Tensor, Tensor], Callable], Tensor]]:
        """Each decoder layer as one step ``(x, rope, attention) -> x`` (:meth:`DecoderLayer.step`), in order: the
        engine runs them from :meth:`embed` to :meth:`logits` with its KV cache as ``attention``."""
        return [layer.step for layer in self.model.layers]

    def fuse_projections(self) -> None:
        """Inference: each layer's q|k|v and gate|up weights become views of one tensor, run as one GEMM whose output
        is split (fewer, larger GEMMs read the weights faster in decoding; gpt-fast's ``wqkv``, ``w1|w3``).

        No second copy: the parameters are views of the fused weights, so state-dict names and values, loading and
        saving are unchanged. Gradients would not reach them, so a forward with gradients refuses (until
        :meth:`unfuse_projections`); ``.to()`` keeps the model fused. Calling it again does nothing."""
        if self.zero_managed:
            raise RuntimeError("fuse_projections: DeepSpeed ZeRO manages these parameters (training); fuse an inference model")
        with torch.no_grad():
            for layer in self.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                if attn.qkv_weight is None:
                    attn.qkv_weight = fuse_weights([attn.q_proj, attn.k_proj, attn.v_proj])
                if mlp.gate_up_weight is None:
                    mlp.gate_up_weight = fuse_weights([mlp.gate_proj, mlp.up_proj])

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`: each weight in its own tensor again, projections as separate GEMMs."""
        with torch.no_grad():
            for layer in self.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                    linear.weight.data = linear.weight.detach().clone()
                attn.qkv_weight = mlp.gate_up_weight = None

    @property
    def zero_managed(self) -> bool:
        """Whether DeepSpeed ZeRO owns the parameters (it tags each with ``ds_id``): such a model cannot be fused."""
        return any(hasattr(p, "ds_id") for p in self.parameters())

    @property
    def projections_fused(self) -> bool:
        return any(layer.self_attn.qkv_weight is not None for layer in self.model.layers)

    def _forget_fused(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.qkv_weight = layer.mlp.gate_up_weight = None

    def _apply(self, fn, recurse=True):
        """``to()``, ``cuda()``, ``half()`` give each parameter a new tensor: a fused model is fused again there."""
        fused = self.projections_fused
        self._forget_fused()
        out = super()._apply(fn, recurse)
        if fused:
            self.fuse_projections()
        return out

    def __setstate__(self, state):
        """``copy.deepcopy`` clones each parameter apart from the fused weights: a fused copy is fused on its own tensors
        (a pickled one keeps its views, so that fusing again copies nothing)."""
        super().__setstate__(state)
        if self.projections_fused:
            self._forget_fused()
            self.fuse_projections()
