"""Typed configs: small YAML files validated into dataclasses, with errors that name the bad field.

``from_dict(cls, data, where)`` turns a mapping into a (nested) dataclass: unknown keys, missing
required keys and wrong types are errors naming the dotted path (``model.num_kv_heads``). A
dataclass with a ``validate(where)`` method is validated right after it is built.

Model sizes are named flavors under ``configs/model/`` (``tiny``, ``125m``, ``llama3.2-1b``,
``llama3-8b``); :func:`load_model_config` takes a flavor name or a YAML path.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segtrain.attention.backends import BACKEND_NAMES
from segtrain.errors import UserError
from segtrain.policy import PolicyError, PolicyTable

__all__ = ["ConfigError", "ModelConfig", "from_dict", "load_model_config", "load_yaml", "model_flavors", "FLAVOR_DIR"]

FLAVOR_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class ConfigError(UserError):
    """A config value that cannot be used; the message starts with the dotted name of the field."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers: ``3e-3`` and ``1e5`` are floats (PyYAML follows YAML 1.1, which wants ``3.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def load_yaml(text: str, where: str = "YAML"):
    """Parse config text (numbers as YAML 1.2 reads them); malformed YAML is a :class:`ConfigError` naming ``where``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp, value, where: str):
    """``value`` checked against the annotation ``tp`` (ints are accepted where floats are expected)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _convert(args[1], v, _join(where, str(k))) for k, v in value.items()} if args else dict(value)
    return value


def from_dict(cls, data, where: str = "model"):
    """Build dataclass ``cls`` from a mapping; errors name ``where.field``. Nested dataclasses recurse."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{_join(where, str(unknown[0]))}: unknown key; known keys are {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def _default_policy():
    return {"fraction": 0.25}


@dataclass
class ModelConfig:
    """A Llama-style decoder and its segment execution (``segment_size``, ``history_policy``).

    ``history_policy`` is anything :meth:`PolicyTable.from_spec` accepts: a policy string for every
    head, ``{"first_k": k}`` / ``{"fraction": f}`` (with optional ``policy``/``rest``), or a list with
    one entry per layer. ``rope_scaling`` is None or Llama-3 style (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``; ``rope_type: llama3`` optional).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: num_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    segment_size: int = 4096
    history_policy: str | dict | list = field(default_factory=_default_policy)
    attention_backend: str = "auto"
    initializer_range: float = 0.02
    carry_grad: bool = True  # gradient into the previous segment's K/V; false: Transformer-XL stop-gradient (ablation)
    # document mode (DESIGN.md §1 "Documents"): position_ids restarting at 0 start a new document of a packed sequence;
    # segments restart with it and it sees no other document. False: a packed sequence is one stream
    documents: bool = False

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and isinstance(self.num_heads, int) and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads
        self.validate("model")

    def validate(self, where: str = "model") -> ModelConfig:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings", "segment_size"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_join(where, name)}: must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{_join(where, 'num_kv_heads')}: {self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{_join(where, 'head_dim')}: {self.head_dim} must be even (RoPE rotates pairs)")
        for name in ("rope_theta", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_join(where, name)}: must be > 0, got {getattr(self, name)!r}")
        if not self.initializer_range >= 0:
            raise ConfigError(f"{_join(where, 'initializer_range')}: must be >= 0, got {self.initializer_range!r}")
        if self.attention_backend not in BACKEND_NAMES:
            raise ConfigError(
                f"{_join(where, 'attention_backend')}: unknown backend {self.attention_backend!r}; "
                f"choose one of {list(BACKEND_NAMES)}"
            )
        self._validate_rope_scaling(_join(where, "rope_scaling"))
        for name in ("carry_grad", "documents"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{_join(where, name)}: must be true or false, got {getattr(self, name)!r}")
        try:
            self.policy_table()
        except PolicyError as e:
            raise ConfigError(f"{_join(where, 'history_policy')}: {e}") from None
        return self

    def _validate_rope_scaling(self, where: str) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError(f"{where}: expected null or a mapping, got {rs!r}")
        extra = set(rs) - set(ROPE_SCALING_KEYS) - {"rope_type"}
        if extra:
            raise ConfigError(
                f"{where}.{sorted(extra)[0]}: unknown key; known keys are {sorted(ROPE_SCALING_KEYS)} and rope_type"
            )
        if rs.get("rope_type", "llama3") != "llama3":
            raise ConfigError(f"{where}.rope_type: only 'llama3' scaling is supported, got {rs['rope_type']!r}")
        for key in ROPE_SCALING_KEYS:
            if key not in rs:
                raise ConfigError(f"{where}.{key}: required key is missing")
            value = rs[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{where}.{key}: must be a positive number, got {value!r}")
        if not rs["high_freq_factor"] > rs["low_freq_factor"]:
            raise ConfigError(
                f"{where}.high_freq_factor: {rs['high_freq_factor']} must be above low_freq_factor={rs['low_freq_factor']}"
            )

    def policy_table(self) -> PolicyTable:
        """History policy per (layer, KV head)."""
        return PolicyTable.from_spec(self.history_policy, self.num_layers, self.num_kv_heads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> ModelConfig:
        return from_dict(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str | Path, where: str = "model") -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{where}: config file not found: {path}")
        return from_dict(cls, load_yaml(path.read_text(), str(path)) or {}, where)


def model_flavors() -> list[str]:
    """Names of the flavors in ``configs/model/``."""
    return sorted(p.stem for p in FLAVOR_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str | Path, overrides: dict | None = None) -> ModelConfig:
    """A flavor name (``tiny``, ``llama3-8b``, ...) or a YAML path, with optional field overrides."""
    path = Path(name_or_path)
    if not path.is_file():
        flavor = FLAVOR_DIR / f"{name_or_path}.yaml"
        if not flavor.is_file():
            raise ConfigError(f"model: {name_or_path!r} is neither a YAML file nor a flavor; flavors are {model_flavors()}")
        path = flavor
    data = load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"model: {path} must hold a mapping")
    return from_dict(ModelConfig, {**data, **(overrides or {})}, "model")
