"""The scale path (DESIGN.md §3): megatron-core ``GPTModel`` whose core attention is ``segment_attention``.

megatron-core builds the Llama-style decoder (RMSNorm, SwiGLU, GQA, RoPE, no biases) and its
tensor/pipeline parallelism; segtrain fills one slot of its layer spec, ``core_attention``, with
:class:`SegmentCoreAttention`. That module gets the local TP heads' q, k, v after megatron's RoPE, in
``[T, B, H, D]``, runs the layer's policies for its KV heads (:meth:`PolicyTable.shard`, the same
contiguous heads megatron gives the rank) and returns ``[T, B, H*D]``. The layer's policy row is
``layer_number - 1``: megatron numbers layers from 1 and adds the pipeline stage's offset.

Context parallelism is segtrain's, not megatron's: ``parallel_state`` is initialized with the CP size
(its CP, DP and DP x CP groups are the ones segtrain and DeepSpeed use), while ``TransformerConfig``
keeps ``context_parallel_size=1`` so that megatron's own CP machinery (TE's ring attention, zig-zag
sharding, the schedule's sequence split) stays out of the way. :class:`SegmentCoreAttention`'s
``SegmentAttention`` slot is then filled with the CP exchange over megatron's CP group, each TP rank
exchanging its own KV heads (:class:`segtrain.parallel.apply.ContextParallelRun`).

RoPE: megatron's rotary is non-interleaved ``rotate_half`` like HF, with angles in float32 cast to
the activation dtype; its llama3 scaling hard-codes ``low/high_freq_factor`` and the original
context, so the model's rotary module takes :func:`segtrain.models.llama.rope_inv_freq` (one formula
for both models; :mod:`segtrain.compat.megatron_core`). Positions are the model's ``position_ids``
(absolute: a CP shard's own), ``0..T-1`` when none are given.

Weights move between this model and HF names with :mod:`segtrain.models.megatron_adapter`.
megatron-core needs an initialized ``parallel_state`` (:func:`init_model_parallel`); it runs on GPUs,
and on CPU over gloo (:func:`segtrain.compat.megatron_core.cpu_collectives` for TP gathers and PP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from segtrain.attention import Documents, SegmentAttention
from segtrain.attention.te import te_importable
from segtrain.config import ModelConfig
from segtrain.models.megatron_adapter import check_layout
from segtrain.policy import PolicyTable

__all__ = [
    "SegmentCoreAttention",
    "build_gpt_model",
    "init_model_parallel",
    "layer_spec",
    "te_available",
    "transformer_config",
]


def te_available() -> bool:
    """Transformer Engine importable (then megatron's TE layer spec provides the linear layers)."""
    return te_importable()


def _megatron_module():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class SegmentCoreAttention(_megatron_module()):
    """megatron ``core_attention`` slot: segment attention over this TP rank's heads with this layer's policies.

    Built by megatron with its usual keyword arguments, plus ``policies`` (the whole model's
    :class:`PolicyTable`), ``segment_size``, ``backend`` and ``carry_grad`` from the layer spec's
    ``params``. It converts megatron's layout and calls its own slot, a :class:`SegmentAttention`.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        policies: PolicyTable,
        segment_size: int,
        backend: str = "auto",
        carry_grad: bool = True,
    ):
        super().__init__(config=config)
        from megatron.core import parallel_state

        if config.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size}: segtrain runs context parallelism itself "
                "(segtrain.parallel), not through megatron's core attention"
            )
        tp_group = pg_collection.tp if pg_collection is not None and hasattr(pg_collection, "tp") else None
        tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
        tp, rank = tp_group.size(), tp_group.rank()
        if not 1 <= layer_number <= policies.n_layers:
            raise ValueError(f"layer_number={layer_number} outside the policy table's {policies.n_layers} layers")
        if config.num_query_groups % tp:
            raise ValueError(f"num_query_groups={config.num_query_groups} is not a multiple of the TP size {tp}")
        self.layer_number = layer_number
        self.core_attention = SegmentAttention(  # the slot: context parallelism fills it, like the portable model's
            segment_size=segment_size,
            policy=policies.shard(rank, tp)[layer_number - 1],
            n_kv_heads=config.num_query_groups // tp,
            backend=backend,
            carry_grad=carry_grad,
            scale=softmax_scale,
            layer=layer_number - 1,
        )
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling changes the softmax scale per layer; segtrain keeps 1/sqrt(D)")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, /, *, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> Tensor:  # fmt: skip
        """``query [T, B, Hq, D]``, ``key, value [T, B, Hkv, D]`` (local heads) -> ``[T, B, Hq * D]``.

        ``attention_mask`` is ignored (the segment structure and causality are the mask), except in document mode,
        where it carries the packed :class:`~segtrain.attention.Documents` (:func:`document_mode`).
        """
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("segment attention takes whole sequences: no packed sequences, no attention bias")
        T, B, H, D = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if isinstance(attention_mask, Documents):  # document mode (document_mode)
            out = self.core_attention(q, k, v, documents=attention_mask)
        else:
            out = self.core_attention(q, k, v)
        return out.permute(2, 0, 1, 3).reshape(T, B, H * D)


def document_mode(model) -> None:
    """Document mode (``ModelConfig.documents``) for a megatron ``GPTModel`` stage: each forward reads the packed
    documents from its ``position_ids`` (a CP shard's, every pipeline stage's) and passes them as the
    ``attention_mask`` that megatron hands to every core attention, so that they travel with the call (megatron's
    activation recompute replays it with the same argument), whatever TP holds of the heads."""

    def before(module, args, kwargs):
        args = list(args)
        positions = args[1] if len(args) > 1 else kwargs.get("position_ids")
        documents = None if positions is None else Documents.from_position_ids(positions)  # CP ranks agree on the mode
        if len(args) > 2:
            args[2] = documents
        else:
            kwargs["attention_mask"] = documents
        return tuple(args), kwargs

    model.register_forward_pre_hook(before, with_kwargs=True)


def layer_spec(config: ModelConfig, *, use_te: bool | None = None):
    """megatron's GPT layer spec (TE's when available, else local) with ``core_attention`` replaced by ours."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.spec_utils import ModuleSpec

    use_te = te_available() if use_te is None else use_te
    if use_te:  # TE's fused norm+linear layers (GPU tests: tests/test_megatron_te_gpu.py)
        spec = specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    params = {
        "policies": config.policy_table(),
        "segment_size": config.segment_size,
        "backend": config.attention_backend,
        "carry_grad": config.carry_grad,
    }
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=SegmentCoreAttention, params=params)
    return spec


def transformer_config(config: ModelConfig, *, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32,
                       fused: bool = False, use_te: bool = False, **overrides):  # fmt: skip
    """megatron ``TransformerConfig`` for the Llama-style model ``config`` describes (no dropout, no biases);
    ``fused``: megatron's fused elementwise kernels (:func:`fusion_overrides`)."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import init_method_normal

    check_layout(config, tp, pp)
    kwargs = dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_heads,
        num_query_groups=config.num_kv_heads,
        kv_channels=config.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=config.initializer_range,
        # the portable model's (and HF's) init: every weight N(0, initializer_range); megatron's default scales the
        # output projections by 1/sqrt(2 * num_layers), so the two recipes would start one model from two inits
        output_layer_init_method=init_method_normal(config.initializer_range),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
        **fusion_overrides(fused, use_te=use_te, dtype=dtype),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def fusion_overrides(fused: bool, *, use_te: bool, dtype: torch.dtype) -> dict:
    """megatron's fused kernels for the elementwise work between the GEMMs: SwiGLU, the residual add
    (bias-dropout-add), with TE's layers TE's RoPE kernel and, for a bf16 model, the vocab-parallel
    cross-entropy (megatron's fused one returns the logits' gradient in bf16 whatever their dtype).

    On for CUDA runs (:func:`build_gpt_model`); off on CPU, where the model is the float64 test oracle.
    Unfused, this work took 256 of 1139 ms of a 1B step at T=32K on an H200 (docs/bench/README.md, Transformer Engine).
    """
    return dict(
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        cross_entropy_loss_fusion=fused and dtype == torch.bfloat16,
        apply_rope_fusion=fused and use_te,
    )


def build_gpt_model(config: ModelConfig, *, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32,
                    use_te: bool | None = None, fused: bool | None = None, **config_overrides):  # fmt: skip
    """This rank's ``GPTModel`` stage (``parallel_state`` must be initialized with the same ``tp``/``pp``).

    ``fused`` (default: on for a bf16/fp16 model when CUDA is available): megatron's fused elementwise kernels
    (:func:`fusion_overrides`).

    Logits stay split over TP ranks (``[B, T, vocab / tp]``, what megatron's vocab-parallel
    cross-entropy needs for ``labels=...``); ``model(..., runtime_gather_output=True)`` gathers them.
    """
    from megatron.core import parallel_state

    from segtrain.compat.megatron_core import segment_gpt_model, segment_rotary_embedding
    from segtrain.models.llama import rope_inv_freq

    use_te = te_available() if use_te is None else use_te
    if fused is None:
        fused = torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16)
    tcfg = transformer_config(config, tp=tp, pp=pp, dtype=dtype, fused=fused, use_te=use_te, **config_overrides)
    model = segment_gpt_model()(
        config=tcfg,
        transformer_layer_spec=layer_spec(config, use_te=use_te),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=config.rope_theta,
    )
    model.to(dtype)  # megatron's torch norms are created in the default dtype, whatever params_dtype says
    device = model.rotary_pos_emb.inv_freq.device
    # HF's llama3 formula with all four parameters (megatron's hard-codes three), on the model's device
    model.rotary_pos_emb = segment_rotary_embedding(
        rope_inv_freq(config).to(device), kv_channels=config.head_dim, shared_positions=tcfg.apply_rope_fusion
    )
    if config.documents:
        document_mode(model)
    return model


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234) -> None:
    """megatron ``parallel_state`` over the default process group (DP is what remains), and its TP RNG tracker.

    ``cp``: the context-parallel size of the groups only (segtrain's CP exchange runs over megatron's CP group;
    the model's ``TransformerConfig`` keeps ``context_parallel_size=1``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
    else:
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_context_parallel_world_size())  # fmt: skip
        if have != (tp, pp, cp):
            raise ValueError(f"megatron parallel_state is already initialized with (tp, pp, cp) = {have}, not {(tp, pp, cp)}")
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
