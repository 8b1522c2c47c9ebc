"""HF Llama names <-> megatron-core ``GPTModel`` shards (local layer spec), pure torch: no megatron import.

One mapping table, both directions (like torchtitan's state-dict adapters). Per layer ``l``:

| HF (``models/llama.py``)                          | megatron (stage-local layer ``i``)                | TP split |
| ------------------------------------------------- | ------------------------------------------------- | -------- |
| ``model.embed_tokens.weight``                     | ``embedding.word_embeddings.weight`` (first stage) | rows     |
| ``model.layers.l.input_layernorm.weight``         | ``decoder.layers.i.input_layernorm.weight``       | copy     |
| ``model.layers.l.self_attn.{q,k,v}_proj.weight``  | ``decoder.layers.i.self_attention.linear_qkv.weight`` | query groups |
| ``model.layers.l.self_attn.o_proj.weight``        | ``decoder.layers.i.self_attention.linear_proj.weight`` | columns |
| ``model.layers.l.post_attention_layernorm.weight`` | ``decoder.layers.i.pre_mlp_layernorm.weight``    | copy     |
| ``model.layers.l.mlp.{gate,up}_proj.weight``      | ``decoder.layers.i.mlp.linear_fc1.weight``        | rows, [gate; up] |
| ``model.layers.l.mlp.down_proj.weight``           | ``decoder.layers.i.mlp.linear_fc2.weight``        | columns  |
| ``model.norm.weight``                             | ``decoder.final_layernorm.weight`` (last stage)   | copy     |
| ``lm_head.weight``                                | ``output_layer.weight`` (last stage)              | rows     |

``linear_qkv`` is megatron's GQA layout: for each KV head (query group) its ``Hq/Hkv`` query heads,
then its key head, then its value head; TP rank ``r`` holds query groups ``r*G/tp .. (r+1)*G/tp``,
the same contiguous KV heads :meth:`PolicyTable.shard` gives that rank. Pipeline stages hold
``num_layers/pp`` consecutive layers each, numbered from 0 in every stage (megatron's local names).
With tied embeddings megatron has no ``output_layer.weight`` when one stage holds both ends; with
``pp > 1`` the last stage keeps a copy of the embedding (megatron keeps the two equal by an
all-reduce of their gradients), which :func:`megatron_to_hf` drops.

Vocabulary: megatron-core splits the vocabulary evenly over TP ranks and does not pad it itself
(Megatron-LM's training script pads; padded logits would change the softmax). segtrain does not
pad: ``vocab_size`` must be a multiple of ``tp`` (a ConfigError says so), so conversion is exact.

Training checkpoints hold these shards, one file per (TP, PP) rank: :mod:`segtrain.checkpoint.run`
owns that layout and reads them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segtrain.config import ConfigError, ModelConfig

__all__ = [
    "check_layout",
    "hf_to_megatron",
    "layer_range",
    "megatron_to_hf",
    "spelled_like",
]

_NORM_NAMES = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
)
# Transformer Engine's layer spec fuses the norms into the following linear: same tensors, other names.
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def check_layout(config: ModelConfig, tp: int, pp: int) -> None:
    """``tp``/``pp`` fit the model: errors name the field."""
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
    for field, size in (("num_kv_heads", config.num_kv_heads), ("num_heads", config.num_heads),
                        ("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size)):  # fmt: skip
        if size % tp:
            raise ConfigError(f"model.{field}: {size} is not a multiple of parallel.tp={tp} (megatron splits it evenly)")
    if config.num_layers % pp:
        raise ConfigError(f"model.num_layers: {config.num_layers} is not a multiple of parallel.pp={pp}")


def layer_range(config: ModelConfig, pp: int, pp_rank: int) -> range:
    """Global indices of the layers pipeline stage ``pp_rank`` holds."""
    n = config.num_layers // pp
    return range(pp_rank * n, (pp_rank + 1) * n)


def _qkv(q: Tensor, k: Tensor, v: Tensor, config: ModelConfig) -> Tensor:
    """HF q/k/v projections -> megatron's fused ``[G, (Hq/G + 2) * D, hidden]`` (all groups)."""
    G, D = config.num_kv_heads, config.head_dim
    hidden = q.shape[1]
    q = q.view(G, (config.num_heads // G) * D, hidden)
    return torch.cat([q, k.view(G, D, hidden), v.view(G, D, hidden)], dim=1)


def hf_to_megatron(state: dict[str, Tensor], config: ModelConfig, tp: int, pp: int) -> dict[tuple[int, int], dict[str, Tensor]]:
    """Split an HF-named state dict into megatron shards ``{(tp_rank, pp_rank): {name: tensor}}``.

    Tensors are copies (contiguous, same dtype), so shards can be saved or loaded independently.
    """
    check_layout(config, tp, pp)
    state = dict(state)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing = [k for k in _hf_names(config) if k not in state]
    if missing:
        raise KeyError(
            f"state dict lacks {missing[0]!r} (and {len(missing) - 1} more)"
            if len(missing) > 1
            else f"state dict lacks {missing[0]!r}"
        )

    def rows(t: Tensor, r: int) -> Tensor:
        return t.chunk(tp, dim=0)[r].clone()

    def cols(t: Tensor, r: int) -> Tensor:
        return t.chunk(tp, dim=1)[r].clone()

    shards: dict[tuple[int, int], dict[str, Tensor]] = {}
    for p in range(pp):
        first, last = p == 0, p == pp - 1
        for r in range(tp):
            out: dict[str, Tensor] = {}
            if first:
                out["embedding.word_embeddings.weight"] = rows(state["model.embed_tokens.weight"], r)
            for i, layer in enumerate(layer_range(config, pp, p)):
                hf, mg = f"model.layers.{layer}.", f"decoder.layers.{i}."
                for a, b in _NORM_NAMES:
                    out[mg + b] = state[hf + a].clone()
                a = hf + "self_attn."
                qkv = _qkv(state[a + "q_proj.weight"], state[a + "k_proj.weight"], state[a + "v_proj.weight"], config)
                out[mg + "self_attention.linear_qkv.weight"] = rows(qkv, r).flatten(0, 1)
                out[mg + "self_attention.linear_proj.weight"] = cols(state[a + "o_proj.weight"], r)
                m = hf + "mlp."
                gate, up = rows(state[m + "gate_proj.weight"], r), rows(state[m + "up_proj.weight"], r)
                out[mg + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
                out[mg + "mlp.linear_fc2.weight"] = cols(state[m + "down_proj.weight"], r)
            if last:
                out["decoder.final_layernorm.weight"] = state["model.norm.weight"].clone()
                if not (config.tie_word_embeddings and pp == 1):
                    out["output_layer.weight"] = rows(state["lm_head.weight"], r)
            shards[(r, p)] = out
    return shards


def _hf_names(config: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        names += [p + n for n, _ in _NORM_NAMES]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def _normalize(name: str) -> str | None:
    """A megatron name in the local spec's spelling; None for entries that hold no weights (``_extra_state``)."""
    if name.endswith("_extra_state"):
        return None
    name = name.removeprefix("module.")
    for te, local in _TE_NAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def spelled_like(shard: dict[str, Tensor], model_names) -> dict[str, Tensor]:
    """``shard`` (local-spec names, from :func:`hf_to_megatron`) renamed to the model's spelling: a model built with
    Transformer Engine's layer spec names the norms after the linear they are fused into."""
    names = set(model_names)
    out = {}
    for name, tensor in shard.items():
        if name not in names:
            for te, local in _TE_NAMES.items():
                if name.endswith(local) and name[: -len(local)] + te in names:
                    name = name[: -len(local)] + te
                    break
        out[name] = tensor
    return out


def megatron_to_hf(shards: dict[tuple[int, int], dict[str, Tensor]], config: ModelConfig, tp: int, pp: int) -> dict[str, Tensor]:
    """Merge megatron shards back into one HF-named state dict (inverse of :func:`hf_to_megatron`).

    Accepts Transformer Engine spellings (norms fused into ``linear_qkv``/``linear_fc1``) and ignores
    ``_extra_state`` entries. A tied model's result has no ``lm_head.weight`` (HF saves it that way).
    """
    check_layout(config, tp, pp)
    want = {(r, p) for r in range(tp) for p in range(pp)}
    if set(shards) != want:
        raise KeyError(f"shards hold ranks {sorted(shards)}, a tp={tp} x pp={pp} model needs {sorted(want)}")
    norm = {key: {n: t for k, t in shard.items() if (n := _normalize(k)) is not None} for key, shard in shards.items()}

    def get(r: int, p: int, name: str) -> Tensor:
        try:
            return norm[(r, p)][name]
        except KeyError:
            raise KeyError(f"shard (tp_rank={r}, pp_rank={p}) lacks {name!r}") from None

    def cat(p: int, name: str, dim: int) -> Tensor:
        return torch.cat([get(r, p, name) for r in range(tp)], dim=dim)

    G, D, Hq = config.num_kv_heads, config.head_dim, config.num_heads
    out: dict[str, Tensor] = {"model.embed_tokens.weight": cat(0, "embedding.word_embeddings.weight", 0)}
    for p in range(pp):
        for i, layer in enumerate(layer_range(config, pp, p)):
            hf, mg = f"model.layers.{layer}.", f"decoder.layers.{i}."
            for a, b in _NORM_NAMES:
                out[hf + a] = get(0, p, mg + b).clone()
            qkv = cat(p, mg + "self_attention.linear_qkv.weight", 0)
            qkv = qkv.view(G, (Hq // G + 2) * D, qkv.shape[-1])
            q, k, v = qkv.split([(Hq // G) * D, D, D], dim=1)
            a = hf + "self_attn."
            out[a + "q_proj.weight"] = q.reshape(Hq * D, -1).clone()
            out[a + "k_proj.weight"] = k.reshape(G * D, -1).clone()
            out[a + "v_proj.weight"] = v.reshape(G * D, -1).clone()
            out[a + "o_proj.weight"] = cat(p, mg + "self_attention.linear_proj.weight", 1)
            fc1 = [get(r, p, mg + "mlp.linear_fc1.weight").chunk(2, dim=0) for r in range(tp)]
            out[hf + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in fc1], dim=0)
            out[hf + "mlp.up_proj.weight"] = torch.cat([u for _, u in fc1], dim=0)
            out[hf + "mlp.down_proj.weight"] = cat(p, mg + "mlp.linear_fc2.weight", 1)
    out["model.norm.weight"] = get(0, pp - 1, "decoder.final_layernorm.weight").clone()
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = cat(pp - 1, "output_layer.weight", 0)
    return out
