"""The Hugging Face Llama format: config translation, the tensor table, lazy reading and streamed writing.

The portable model already uses HF Llama parameter names, so the mapping table is the identity on
names: :func:`tensor_shapes` is the table (every tensor a config implies, with its shape), used in
both directions to check a state dict before anything is written. A tied head is stored once, as
``model.embed_tokens.weight``, in both formats.

An HF ``config.json`` carries segtrain's execution under a ``segtrain`` key (segment size, the
explicit per-layer/per-KV-head policy table, attention backend), so a model keeps its policy through HF
and back. By default the directory runs that execution in transformers: ``model_type`` is
``segtrain_llama`` and ``auto_map`` names ``modeling_segtrain.py``, a copy of :mod:`segtrain.checkpoint.hf_modeling`
(loaded with ``trust_remote_code=True``; without it transformers refuses and asks for it). ``plain_llama``
writes a ``LlamaForCausalLM`` instead, which transformers runs with full attention. Without a ``segtrain``
key, :func:`config_from_hf` takes the segment size and policy from arguments, else every head ``all``
(which equals full causal attention for any segment size: the HF model's own semantics).

Reading is lazy (``safe_open`` / ``torch.load(mmap=True)``) and writing is streamed one tensor at a
time (:func:`write_safetensors`), so converting an 8B model needs far less RAM than its size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from segtrain.config import ConfigError, ModelConfig, from_dict
from segtrain.errors import UserError
from segtrain.policy import PolicyError
from segtrain.userfiles import read_json

__all__ = [
    "ConversionError",
    "LazyState",
    "MODELING_FILE",
    "PolicyArgumentError",
    "SEGTRAIN_KEY",
    "config_from_hf",
    "config_to_hf",
    "hf_config_dict",
    "is_hf_dir",
    "open_hf_weights",
    "parse_policy_arg",
    "parse_size",
    "plan_shards",
    "safetensors_state",
    "tensor_shapes",
    "write_hf_dir",
    "write_safetensors",
]

SEGTRAIN_KEY = "segtrain"
ARCHITECTURE = "LlamaForCausalLM"
# The segment-attention export: hf_modeling.py, copied as MODELING_FILE (its MODEL_TYPE and class names; a test checks)
SEGMENT_ARCHITECTURE = "SegtrainLlamaForCausalLM"
SEGMENT_MODEL_TYPE = "segtrain_llama"
MODELING_FILE = "modeling_segtrain.py"
AUTO_MAP = {
    "AutoConfig": "modeling_segtrain.SegtrainLlamaConfig",
    "AutoModelForCausalLM": f"modeling_segtrain.{SEGMENT_ARCHITECTURE}",
}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
# Tensors old HF Llama checkpoints carry that are recomputed from the config: skipped on read.
_IGNORED = re.compile(r"^(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")


class ConversionError(UserError):
    """A checkpoint that cannot be converted; the message names the file, tensor or field."""


# ---- the tensor table ---------------------------------------------------------------------------


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Llama checkpoint ``config`` describes (HF names = segtrain names), in HF order."""
    h, q, kv, ff = (
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.intermediate_size,
    )
    table = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        table.update({
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    table["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        table["lm_head.weight"] = (config.vocab_size, h)
    return table


def check_tensors(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> list[str]:
    """The names to copy, in table order; raises naming the first missing, unexpected or misshapen tensor."""
    table = tensor_shapes(config)
    names = [n for n in shapes if not _IGNORED.match(n)]
    if config.tie_word_embeddings and "lm_head.weight" in names:
        names.remove("lm_head.weight")  # some tied checkpoints store the head twice; it is the embedding
    missing = [n for n in table if n not in shapes]
    if missing:
        raise ConversionError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    unexpected = [n for n in names if n not in table]
    if unexpected:
        raise ConversionError(f"{source}: unexpected tensor {unexpected[0]!r} (not part of a Llama model with this config)")
    for name, shape in table.items():
        if tuple(shapes[name]) != shape:
            raise ConversionError(f"{source}: tensor {name!r} has shape {list(shapes[name])}, the config implies {list(shape)}")
    return list(table)


# ---- config translation --------------------------------------------------------------------------


def hf_config_dict(config: ModelConfig) -> dict:
    """Keyword arguments for ``transformers.LlamaConfig`` describing the same architecture."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**rope, **{k: v for k, v in config.rope_scaling.items() if k != "rope_type"}, "rope_type": "llama3"}
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
    )


def config_to_hf(
    config: ModelConfig,
    dtype: torch.dtype,
    *,
    bos_id: int = 1,
    eos_id: int = 2,
    pad_id: int | None = 0,
    plain_llama: bool = False,
) -> dict:
    """An HF ``config.json`` for ``config``, with segtrain's execution under ``segtrain``: the segment-attention model
    of ``modeling_segtrain.py`` (``auto_map``), or with ``plain_llama`` a ``LlamaForCausalLM`` (full attention).

    The architecture fields are :func:`hf_config_dict`'s; RoPE is written the way transformers 4 and
    5 both read it (``rope_theta`` + ``rope_scaling``, not 5's ``rope_parameters``).
    """
    fields = hf_config_dict(config)
    rope = fields.pop("rope_parameters")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope["rope_type"] != "default" else None
    kind = {"architectures": [ARCHITECTURE], "model_type": "llama"}
    if not plain_llama:
        kind = {"architectures": [SEGMENT_ARCHITECTURE], "model_type": SEGMENT_MODEL_TYPE, "auto_map": dict(AUTO_MAP)}
    return {
        **kind,
        **fields,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": scaling,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype in SAFETENSORS_DTYPES else "float32",
        SEGTRAIN_KEY: {
            "segment_size": config.segment_size,
            "history_policy": config.policy_table().to_spec(),
            "attention_backend": config.attention_backend,
        },
    }


def _rope(hf: dict, where: str) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from transformers 4 (``rope_theta``/``rope_scaling``) or 5 (``rope_parameters``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConfigError(f"{where}.rope_scaling.rope_type: {kind!r} is not supported (only default and llama3 RoPE)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ConfigError(f"{where}.rope_scaling.{missing[0]}: required for llama3 RoPE scaling")
    return float(theta), {k: scaling[k] for k in keys}


def config_from_hf(
    hf: dict,
    *,
    segment_size: int | None = None,
    history_policy=None,
    attention_backend: str | None = None,
    source: str = "config.json",
) -> ModelConfig:
    """The segtrain ``ModelConfig`` of an HF Llama config; unsupported architectures fail naming the field.

    Execution fields come from the arguments if given, else from the ``segtrain`` key, else
    ``segment_size=4096`` (ModelConfig's default) and every head ``all``.
    """
    where = str(source)
    if hf.get("model_type") not in ("llama", SEGMENT_MODEL_TYPE):
        raise ConfigError(
            f"{where}.model_type: {hf.get('model_type')!r} is not supported; only 'llama' and {SEGMENT_MODEL_TYPE!r} convert"
        )
    archs = hf.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in archs and SEGMENT_ARCHITECTURE not in archs:
        raise ConfigError(
            f"{where}.architectures: {archs} is not supported; only {ARCHITECTURE!r} and {SEGMENT_ARCHITECTURE!r} convert"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{where}.{key}: true is not supported (segtrain's Llama has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}.hidden_act: {hf['hidden_act']!r} is not supported; only 'silu'")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ConfigError(f"{where}.{key}: required key is missing")
    theta, scaling = _rope(hf, where)
    stored = hf.get(SEGTRAIN_KEY) or {}
    if not isinstance(stored, dict):
        raise ConfigError(f"{where}.{SEGTRAIN_KEY}: expected a mapping, got {stored!r}")
    unknown = set(stored) - {"segment_size", "history_policy", "attention_backend"}
    if unknown:
        raise ConfigError(f"{where}.{SEGTRAIN_KEY}.{sorted(unknown)[0]}: unknown key")
    fields = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "initializer_range": float(hf.get("initializer_range", 0.02)),
        "segment_size": segment_size or stored.get("segment_size", 4096),
        "history_policy": history_policy if history_policy is not None else stored.get("history_policy", "all"),
        "attention_backend": attention_backend or stored.get("attention_backend", "auto"),
    }
    return from_dict(ModelConfig, fields, where)


class PolicyArgumentError(PolicyError, argparse.ArgumentTypeError):
    """A ``--policy`` value that cannot be read: argparse prints its message as is (exit 2); callers may catch PolicyError."""


CALIBRATED = "calibrated:"


def parse_policy_arg(text: str):
    """A policy spec from the command line: a string (``all``, ``sink:4+window:1024``), YAML (``{first_k: 1}``, a
    list), or ``calibrated:PATH[@BUDGET]``: the explicit table of a ``segtrain calibrate`` result (PATH: its model
    dir or ``calibration.json``), for the budget it was calibrated with or re-picked for ``BUDGET``."""
    import yaml

    if text.startswith(CALIBRATED):
        from segtrain.checkpoint.calibration import calibrated_spec

        try:
            return calibrated_spec(text[len(CALIBRATED) :])
        except PolicyError as e:
            raise PolicyArgumentError(str(e)) from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (dict, list)) else text


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory whose ``config.json`` is a transformers config (``model_type``), not a segtrain one."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    meta = read_json(file, error=ConversionError)
    return meta.get("format") != "segtrain" and "model_type" in meta


# ---- lazy reading --------------------------------------------------------------------------------


class LazyState:
    """Name -> shape now, tensor on demand: a source state dict that is never all in memory."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], get: Callable[[str], torch.Tensor]):
        self.shapes, self.dtypes, self._get = shapes, dtypes, get

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def keys(self):
        return self.shapes.keys()

    def renamed(self, rename: Callable[[str], str]) -> LazyState:
        """The same tensors under ``rename(name)``."""
        names = {rename(k): k for k in self.shapes}
        return LazyState({n: self.shapes[k] for n, k in names.items()}, {n: self.dtypes[k] for n, k in names.items()},
                         lambda n: self[names[n]])  # fmt: skip

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LazyState:
        """Over tensors already at hand (mmap-backed ones stay on disk until read)."""
        return cls({k: tuple(v.shape) for k, v in tensors.items()}, {k: v.dtype for k, v in tensors.items()}, tensors.__getitem__)


def safetensors_state(files: list[Path]) -> LazyState:
    from safetensors import safe_open

    handles, shapes, dtypes, where = {}, {}, {}, {}
    for file in files:
        f = handles[file] = safe_open(str(file), framework="pt")
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            sl = f.get_slice(name)
            shapes[name], where[name] = tuple(sl.get_shape()), file
            dtypes[name] = {v: k for k, v in SAFETENSORS_DTYPES.items()}.get(sl.get_dtype())
    return LazyState(shapes, dtypes, lambda name: handles[where[name]].get_tensor(name))


def _index_files(index: Path) -> list[Path]:
    meta = read_json(index, error=ConversionError)
    files = sorted(set((meta.get("weight_map") or {}).values()))
    if not files:
        raise ConversionError(f"{index}: weight_map is empty")
    for name in files:
        if not (index.parent / name).is_file():
            raise ConversionError(f"{index}: shard {name!r} is missing")
    return [index.parent / name for name in files]


def open_hf_weights(path: str | os.PathLike) -> LazyState:
    """The weights of an HF directory: ``model.safetensors``, its sharded index, or ``pytorch_model.bin`` (sharded too)."""
    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        return safetensors_state(_index_files(path / "model.safetensors.index.json"))
    if (path / "model.safetensors").is_file():
        return safetensors_state([path / "model.safetensors"])
    bins = _index_files(path / "pytorch_model.bin.index.json") if (path / "pytorch_model.bin.index.json").is_file() else []
    if not bins and (path / "pytorch_model.bin").is_file():
        bins = [path / "pytorch_model.bin"]
    if not bins:
        raise ConversionError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    tensors = {}
    for file in bins:
        tensors.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    return LazyState.from_tensors(tensors)


# ---- streamed writing ----------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB`` (10^9), ``500MiB`` (2^20), ``1000`` ..., as HF's ``max_shard_size`` reads them."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if m is None:
        raise ValueError(f"--max-shard-size: expected a size like 5GB, 500MB or 2GiB, got {size!r}")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(unit[0] if unit != "B" else " "))


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of at most ``max_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def write_safetensors(
    file: str | os.PathLike,
    names: Iterable[str],
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    get: Callable[[str], torch.Tensor],
    *,
    on_tensor: Callable[[int], None] | None = None,
) -> int:
    """Writes a ``.safetensors`` file one tensor at a time (each cast to ``dtype``); returns its data bytes.

    ``safetensors.torch.save_file`` needs every tensor in memory at once; the format is a JSON header
    (``dtype``, ``shape``, ``data_offsets``) and the raw little-endian data, so we stream it instead.
    """
    names = list(names)
    code, itemsize = SAFETENSORS_DTYPES[dtype], torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        n = itemsize * int(torch.Size(shapes[name]).numel())
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            t = get(name).detach().to(device="cpu", dtype=dtype).contiguous()
            if tuple(t.shape) != tuple(shapes[name]):
                raise ConversionError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shapes[name])}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            if on_tensor is not None:
                on_tensor(t.numel() * itemsize)
            del t
    return offset


# ---- a whole directory ---------------------------------------------------------------------------


def write_hf_dir(
    out: Path,
    config: ModelConfig,
    state: LazyState,
    names: list[str],
    dtype: torch.dtype,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer: str | os.PathLike | None = None,
    on_tensor: Callable[[int], None] | None = None,
    plain_llama: bool = False,
) -> Path:
    """Write an HF Llama directory into an existing (staging) directory ``out``: ``config.json`` (execution under the
    ``segtrain`` key), ``modeling_segtrain.py`` (unless ``plain_llama``), ``model.safetensors`` (sharded with an index
    past ``max_shard_size``), ``generation_config.json`` and, given a sentencepiece ``tokenizer``, its HF tokenizer files."""
    from segtrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, write_hf_tokenizer

    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {n: itemsize * int(torch.Size(state.shapes[n]).numel()) for n in names}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    for file, shard in zip(files, shards):
        write_safetensors(out / file, shard, state.shapes, dtype, state.__getitem__, on_tensor=on_tensor)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {n: file for file, shard in zip(files, shards) for n in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_config = config_to_hf(config, dtype, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, plain_llama=plain_llama)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if not plain_llama:  # the model's code travels with its weights, verbatim
        shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), out / MODELING_FILE)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, out, model_max_length=config.max_position_embeddings)
    return out
