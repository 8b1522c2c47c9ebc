"""``segtrain train`` configs: small YAML files validated into dataclasses, errors naming the field."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from segtrain.config import ConfigError, ModelConfig, from_dict, load_yaml
from segtrain.train.recipes import uses_megatron
from segtrain.train.recipes.base import positive
from segtrain.train.recipes.megatron import MegatronConfig
from segtrain.train.recipes.portable import PortableConfig


@dataclass
class DataConfig:
    """Indexed datasets (megatron-core ``.bin``/``.idx`` prefixes, blended by ``weights``), synthetic tasks, or both
    (``synthetic_fraction`` of the samples synthetic)."""

    prefixes: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    tokenizer: str | None = None
    seq_length: int = 1024
    split: str = "98,2,0"
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    synthetic: str | None = None  # "passkey", "needle", "recall" or e.g. "passkey+needle": generated long-range tasks
    synthetic_fraction: float | None = None  # with prefixes and synthetic: the share of samples that are synthetic
    synthetic_loss: str = "answers"  # "answers": loss on the answer tokens only; "all": on every token of a synthetic sample
    synthetic_options: dict = field(default_factory=dict)  # task options: {filler: noise} for all, {recall: {num_queries: 8}}
    # "token": the loss is the mean over every counted token of a micro-batch; "sample": each sample's own mean, then the
    # mean over samples, so a synthetic sample's few answer tokens weigh as much as a text sample's thousands
    loss_average: str = "token"


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    cp_balance: bool = True  # CP: uneven split of whole segments that evens out per-rank attention cost (parallel/balance.py)
    cp_balance_cap: float | None = None  # CP: with cp_balance, at most this multiple of the even share of tokens per rank
    offload_history: bool = False  # CP: saved history K/V waits in pinned CPU memory between forward and backward
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "fp32"  # "fp32" | "bf16"


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model_impl: str = "portable"  # "portable" (models/llama.py) | "megatron" (models/megatron.py; parallel.tp/pp > 1 imply it)
    steps: int = 1000
    micro_batch_size: int = 1
    grad_accum: int = 1
    seed: int = 1234
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    out_dir: str = "runs/train"
    export_final: bool = True
    portable: PortableConfig = field(default_factory=PortableConfig)  # the portable model's options
    megatron: MegatronConfig = field(default_factory=MegatronConfig)  # the megatron model's options
    deepspeed: dict | str = field(default_factory=dict)  # extra DeepSpeed config (or a JSON file), merged over ours

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# the flat options of the recipes, before the portable: and megatron: sections, and where each moved
MOVED = {
    "activation_checkpointing": ("portable.activation.checkpointing", "megatron.activation.checkpointing"),
    "activation_checkpointing_layers": ("portable.activation.layers", "megatron.activation.layers"),
    "activation_checkpointing_keep_attention": ("portable.activation.keep_attention",),
    "activation_checkpointing_keep_matmuls": ("portable.activation.keep_matmuls",),
    "activation_offload": ("portable.activation.offload",),
    "compile": ("portable.compile",),
    "fused_loss": ("portable.fused_loss",),
    "fp8": ("megatron.fp8",),
}


def _check_moved(raw: dict) -> None:
    """A config (or ``--set``) that still names a flat option stops with one line saying where it moved."""
    for key in raw:
        if key in MOVED:
            raise ConfigError(f"{key}: moved to {' or '.join(MOVED[key])} (docs/train-options.md)")


def validate(cfg: TrainConfig, *, check_paths: bool = True) -> TrainConfig:
    """Check every field before anything is built; errors name the field. The recipe in use checks its own section."""
    for name in ("steps", "micro_batch_size", "grad_accum", "log_every", "save_every"):
        positive(name, getattr(cfg, name))
    if cfg.keep_last < 0:
        raise ConfigError(f"keep_last: must be 0 (keep every checkpoint) or a positive integer, got {cfg.keep_last}")
    positive("data.seq_length", cfg.data.seq_length)
    S = cfg.model.segment_size
    if cfg.data.seq_length % S:
        raise ConfigError(
            f"data.seq_length: {cfg.data.seq_length} is not a multiple of model.segment_size={S}: "
            "training sequences are made of whole segments"
        )
    options = _check_sections(cfg)
    _check_parallel(cfg, recomputes=options.activation.checkpointing)
    _check_deepspeed(cfg)
    positive("optim.warmup_steps", cfg.optim.warmup_steps)  # DeepSpeed's WarmupCosineLR needs at least one
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr: {cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}")
    _check_data(cfg.data)
    if check_paths:
        _check_paths(cfg.data)
    return cfg


def _check_sections(cfg: TrainConfig):
    """The section of the recipe in use checks itself; the other one must be left at its defaults. Returns the first."""
    if cfg.model_impl not in ("portable", "megatron"):
        raise ConfigError(f"model_impl: must be 'portable' or 'megatron', got {cfg.model_impl!r}")
    active, idle = ("megatron", "portable") if uses_megatron(cfg) else ("portable", "megatron")
    if getattr(cfg, idle) != type(getattr(cfg, idle))():
        why = (
            f"model_impl: {cfg.model_impl}" if active == cfg.model_impl else f"parallel.tp/pp={cfg.parallel.tp}/{cfg.parallel.pp}"
        )
        raise ConfigError(f"{idle}: options of the {idle} model, but this config trains the {active} model ({why}); remove them")
    options = getattr(cfg, active)
    options.check(cfg)
    return options


def _check_parallel(cfg: TrainConfig, recomputes: bool) -> None:
    p, S = cfg.parallel, cfg.model.segment_size
    positive("parallel.cp", p.cp)
    if p.cp > cfg.data.seq_length // S:
        raise ConfigError(
            f"parallel.cp: {p.cp} ranks cannot share {cfg.data.seq_length // S} segments "
            f"(data.seq_length={cfg.data.seq_length}, model.segment_size={S}): every CP rank needs a whole segment"
        )
    if p.cp_balance_cap is not None:
        if not p.cp_balance_cap >= 1.0:
            raise ConfigError(
                f"parallel.cp_balance_cap: must be a number >= 1.0 (a multiple of the even share), got {p.cp_balance_cap!r}"
            )
        if not p.cp_balance:
            raise ConfigError("parallel.cp_balance_cap: caps the balanced split; no effect with parallel.cp_balance: false")
    if not cfg.model.carry_grad and p.cp > 1:
        raise ConfigError("model.carry_grad: false (the stop-gradient ablation) runs with parallel.cp=1 only")
    if p.offload_history and p.cp == 1:
        raise ConfigError("parallel.offload_history: history offload applies to context-parallel attention; set parallel.cp > 1")
    if p.offload_history and recomputes:
        raise ConfigError(
            "parallel.offload_history: with activation checkpointing no history is saved between forward and backward "
            "(it is recomputed); turn one of them off"
        )
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {p.zero_stage!r}")
    if p.precision not in ("fp32", "bf16"):
        raise ConfigError(f"parallel.precision: must be 'fp32' or 'bf16', got {p.precision!r}")
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError("parallel.offload_params: parameter offload needs parallel.zero_stage=3")
    if p.offload_optimizer and p.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer: optimizer offload needs parallel.zero_stage >= 1")


def _check_deepspeed(cfg: TrainConfig) -> None:
    """Settings the extra DeepSpeed config repeats must agree with ours."""
    ds, p = cfg.deepspeed if isinstance(cfg.deepspeed, dict) else {}, cfg.parallel
    ds_stage = ds.get("zero_optimization", {}).get("stage")
    if ds_stage is not None and ds_stage != p.zero_stage:
        raise ConfigError(f"deepspeed.zero_optimization.stage: {ds_stage} disagrees with parallel.zero_stage={p.zero_stage}")
    ds_offload = ds.get("offload_history", {}).get("device")
    if ds_offload is not None and (ds_offload == "cpu") != p.offload_history:
        raise ConfigError(
            f"deepspeed.offload_history.device: {ds_offload!r} disagrees with parallel.offload_history={p.offload_history}"
        )
    ds_bf16 = ds.get("bf16", {}).get("enabled")
    if ds_bf16 is not None and ds_bf16 != (p.precision == "bf16"):
        raise ConfigError(f"deepspeed.bf16.enabled: {ds_bf16} disagrees with parallel.precision={p.precision!r}")


def _check_data(data: DataConfig) -> None:
    if data.synthetic is None and not data.prefixes:
        raise ConfigError("data.prefixes: give at least one indexed dataset prefix (or set data.synthetic)")
    if data.loss_average not in ("token", "sample"):
        raise ConfigError(f"data.loss_average: must be 'token' or 'sample', got {data.loss_average!r}")
    if data.synthetic_loss not in ("answers", "all"):
        raise ConfigError(f"data.synthetic_loss: must be 'answers' or 'all', got {data.synthetic_loss!r}")
    fraction = data.synthetic_fraction
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.synthetic_fraction: must be between 0 and 1 (exclusive), got {fraction!r}")
    if fraction is not None and (data.synthetic is None or not data.prefixes):
        raise ConfigError("data.synthetic_fraction: blends data.synthetic with data.prefixes; set both")
    if fraction is None and data.synthetic is not None and data.prefixes:
        raise ConfigError(
            "data.synthetic_fraction: data.synthetic and data.prefixes are both set; give the share of synthetic samples "
            "(e.g. 0.5), or clear one of them (--set data.prefixes=[])"
        )
    if data.weights is not None and len(data.weights) != len(data.prefixes):
        raise ConfigError(f"data.weights: {len(data.weights)} weights for {len(data.prefixes)} prefixes")


def _check_paths(data: DataConfig) -> None:
    from segtrain.data.indexed import IndexedDataError, check_indexed

    for i, prefix in enumerate(data.prefixes):
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(f"data.prefixes[{i}]: {prefix}{suffix} does not exist")
        try:
            check_indexed(prefix)  # a truncated or foreign .bin/.idx stops here, not mid-training
        except IndexedDataError as e:
            raise ConfigError(f"data.prefixes[{i}]: {e}") from None
    if data.tokenizer is not None and not Path(data.tokenizer).exists():
        raise ConfigError(f"data.tokenizer: {data.tokenizer} does not exist")


def _find_model_file(name: str, config_path: Path) -> Path:
    """A model YAML named in a train config: relative to the working directory, the config's folder, the repo root
    (shipped configs name ``configs/model/...``), or a flavor name (``tiny``); or a model directory (working
    directory only)."""
    from segtrain.config import FLAVOR_DIR

    if (Path(name) / "config.json").is_file():
        return Path(name)
    repo = FLAVOR_DIR.parents[1]
    for candidate in (Path(name), config_path.parent / name, repo / name, FLAVOR_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"model.from: {name} does not exist (looked in the working directory, {config_path.parent} and {repo})")


def _base_model_fields(path: Path) -> dict:
    """The fields a ``model.from`` names: a model YAML's, or a model directory's config (segtrain's or a Hugging Face
    Llama's): an adapted model trains with the architecture, segment size and (calibrated) policy its directory holds."""
    if path.is_dir():
        from segtrain.checkpoint import load_config

        return load_config(path).to_dict()
    return load_yaml(path.read_text(), str(path)) or {}


def _apply(raw: dict, overrides: dict) -> None:
    """Set dotted keys (``optim.lr``) in the raw config mapping."""
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for i, name in enumerate(parents):
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parents[: i + 1])}: is {child!r}, so --set {key} has nothing to set")
            node = child
        node[leaf] = value


def load_train_config(path: str | Path, overrides: dict | None = None, *, check_paths: bool = True) -> TrainConfig:
    """Load a YAML train config. ``model:`` is a dict, or a path to a model YAML or model directory (relative paths
    resolve from the working directory), or a dict with ``from: PATH`` plus fields that override it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    overrides = overrides or {}
    # `model` / `model.from` first: the other `model.*` overrides apply to the model file they name
    _apply(raw, {k: v for k, v in overrides.items() if k in ("model", "model.from")})
    model = raw.get("model")
    if isinstance(model, str):
        model = {"from": model}
    if isinstance(model, dict) and "from" in model:
        base = _find_model_file(model["from"], path)
        model = {**_base_model_fields(base), **{k: v for k, v in model.items() if k != "from"}}
    if not isinstance(model, dict):
        raise ConfigError("model: give the model config as a mapping or a path to a model YAML")
    raw["model"] = model
    _apply(raw, {k: v for k, v in overrides.items() if k not in ("model", "model.from")})
    _check_moved(raw)
    if isinstance(raw.get("deepspeed"), str):
        ds_path = Path(raw["deepspeed"])
        if not ds_path.is_file():
            raise ConfigError(f"deepspeed: {ds_path} does not exist")
        try:
            raw["deepspeed"] = json.loads(ds_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed: {ds_path} is not valid JSON: {e}") from None
    return validate(from_dict(TrainConfig, raw, where=""), check_paths=check_paths)


def deepspeed_config(cfg: TrainConfig, dp: int) -> dict:
    """The DeepSpeed JSON config this training config implies, with ``cfg.deepspeed`` merged over it."""
    p, o = cfg.parallel, cfg.optim
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    history = {"offload_history": {"device": "cpu", "pin_memory": True}} if p.offload_history else {}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * dp,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                **({} if p.offload_optimizer else {"torch_adam": True}),
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": cfg.steps,
                "warmup_num_steps": o.warmup_steps,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": o.min_lr / o.lr if o.lr > 0 else 0.0,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": p.precision == "bf16"},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        **history,  # segtrain's key, configured like ZeRO offload; DeepSpeed ignores it
    }
    return _merge(ds, cfg.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
