"""The megatron-core model (``models/megatron.py``): TP/PP through megatron-core, CP by segments, DP/ZeRO through DeepSpeed.

What combines (checked by :meth:`MegatronRecipe.check`, errors name the field):

- TP (``parallel.tp > 1``, or ``model_impl: megatron``): ZeRO stages 0, 1, 2 and optimizer offload;
  fp32 or bf16. DeepSpeed gets the groups' mpu (:class:`segtrain.parallel.groups.DeepSpeedMPU`) so it
  reduces gradients over the data-parallel x context-parallel group only, counts TP-split parameters
  once per rank in the gradient norm and writes one ``mp_rank_XX_model_states.pt`` per model-parallel
  (TP x PP) rank.
- PP (``parallel.pp > 1``): megatron-core's 1F1B schedule runs forward and backward of
  ``grad_accum`` micro-batches (torch-style ``backward`` on each stage's output, which DeepSpeed
  0.19 supports only with its ZeRO optimizers; with two forwards before their backwards, as 1F1B
  runs them, only ZeRO-1 accumulates exactly, checked in tests/test_megatron_train.py): ZeRO-1, untied
  embeddings (a tied embedding lives on the first and last stage and would need its own gradient
  all-reduce). The DeepSpeed pipeline engine is not used. DeepSpeed runs with
  ``managed_gradient_accumulation: false``: backward only accumulates, ``engine.step()`` reduces over
  DP x CP once per step and updates.
- CP (``parallel.cp > 1``) with TP and PP: megatron's ``parallel_state`` holds the CP group, and every
  layer's attention slot runs segtrain's CP exchange over it (:class:`~segtrain.parallel.apply.ContextParallelRun`,
  as in the portable model: each TP rank exchanges its own KV heads, each PP stage its own layers).
  Every rank runs its shard of each micro-batch at its absolute positions; the balanced split and
  history offload apply. Under PP the schedule's activations are this rank's shard (uneven under the
  balanced split, so the shapes are given to the schedule instead of megatron's ``seq_length / cp``).
- Not combined: ZeRO-3 (parameter partitioning under megatron's TP layers).

Weights: initialized by megatron-core (its scaled init for output projections), or loaded from a
portable checkpoint (``--init-from``) through :func:`segtrain.models.megatron_adapter.hf_to_megatron`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from segtrain.config import ConfigError
from segtrain.models.megatron_adapter import check_layout, hf_to_megatron, megatron_to_hf, spelled_like
from segtrain.parallel.groups import Layout, ParallelGroups, build_groups
from segtrain.train.recipes.base import ModelRecipe, check_layers, positive

# TE's delayed scaling: E4M3 forward and E5M2 gradients ("hybrid"), scales from the max amax of the last N steps
FP8_DEFAULTS = {"recipe": "delayed", "format": "hybrid", "amax_history": 1024, "amax_compute": "max"}


@dataclass
class MegatronActivation:
    """megatron-core's own activation recompute (``megatron.activation``): whole layers only."""

    checkpointing: bool = False  # recompute each decoder layer in backward
    layers: int | None = None  # only the first N layers of each pipeline stage; None: every one


@dataclass
class MegatronConfig:
    """The megatron model's options (the ``megatron:`` section of a train config)."""

    fp8: dict | None = None  # FP8 GEMMs (Transformer Engine), null: off; keys and defaults: FP8_DEFAULTS
    fusions: bool = True  # megatron's fused SwiGLU, residual add, cross-entropy and (TE) RoPE on CUDA (CPU runs unfused)
    activation: MegatronActivation = field(default_factory=MegatronActivation)

    def check(self, cfg) -> None:
        """Stop on a bad value before anything is built (errors name the field); fills ``fp8``'s defaults."""
        check_layers("megatron.activation", self.activation.layers, self.activation.checkpointing, cfg)
        if self.fp8 is not None:
            self.fp8 = _checked_fp8(self.fp8, cfg.parallel.precision)


def _checked_fp8(fp8, precision: str) -> dict:
    if not isinstance(fp8, dict):
        raise ConfigError(f"megatron.fp8: must be a mapping like {FP8_DEFAULTS} (or null), got {fp8!r}")
    for key in fp8:
        if key not in FP8_DEFAULTS:
            raise ConfigError(f"megatron.fp8.{key}: unknown; the keys are {list(FP8_DEFAULTS)}")
    f = {**FP8_DEFAULTS, **fp8}
    if f["recipe"] != "delayed":
        raise ConfigError(f"megatron.fp8.recipe: only 'delayed' (DelayedScaling) is wired, got {f['recipe']!r}")
    if f["format"] not in ("hybrid", "e4m3"):
        raise ConfigError(f"megatron.fp8.format: must be 'hybrid' (E4M3 forward, E5M2 gradients) or 'e4m3', got {f['format']!r}")
    positive("megatron.fp8.amax_history", f["amax_history"])
    if f["amax_compute"] not in ("max", "most_recent"):
        raise ConfigError(f"megatron.fp8.amax_compute: must be 'max' or 'most_recent', got {f['amax_compute']!r}")
    if precision != "bf16":
        raise ConfigError(f"megatron.fp8: FP8 GEMMs keep BF16 weights; set parallel.precision: bf16 (got {precision!r})")
    return f


def build_options(options: MegatronConfig, device: torch.device) -> dict:
    """The keyword arguments of :func:`segtrain.models.megatron.build_gpt_model` that ``options`` imply on ``device``
    (TE's layers, fusions, FP8, recompute): the megatron model's one assembly, for training and the benchmarks."""
    return {
        "use_te": True if options.fp8 else None,  # None: TE's layers when it is installed
        "fused": options.fusions and device.type == "cuda",
        "use_cpu_initialization": device.type != "cuda",
        **recompute_overrides(options.activation),
        **fp8_overrides(options.fp8),
    }


def fp8_overrides(fp8: dict | None) -> dict:
    """megatron's ``TransformerConfig`` FP8 fields for ``megatron.fp8`` (checked, defaults filled); megatron then runs
    each layer under TE's FP8 autocast with a ``DelayedScaling`` recipe."""
    if not fp8:
        return {}
    return {"fp8": fp8["format"], "fp8_recipe": fp8["recipe"], "fp8_amax_history_len": fp8["amax_history"],
            "fp8_amax_compute_algo": fp8["amax_compute"]}  # fmt: skip


def recompute_overrides(activation: MegatronActivation) -> dict:
    """Megatron's own activation recompute: every layer ("uniform", one layer per group), or with ``layers: N`` the
    first N layers of each stage ("block")."""
    if not activation.checkpointing:
        return {}
    if activation.layers is None:
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": activation.layers}


class MegatronRecipe(ModelRecipe):
    name = "megatron"

    def check(self, cfg, layout: Layout) -> None:
        p = cfg.parallel
        check_layout(cfg.model, p.tp, p.pp)
        if p.zero_stage == 3:
            raise ConfigError("parallel.zero_stage: ZeRO-3 does not combine with the megatron model (TP/PP); use 0, 1 or 2")
        if p.pp > 1 and p.zero_stage != 1:
            raise ConfigError(
                f"parallel.zero_stage: {p.zero_stage} with parallel.pp={p.pp}; pipeline stages backpropagate through "
                "megatron's 1F1B schedule, whose interleaved backwards DeepSpeed accumulates exactly with ZeRO-1 only "
                "(ZeRO-0 refuses tensor.backward(), ZeRO-2 loses gradients when two forwards precede their backwards): use 1"
            )
        if cfg.megatron.fp8 is not None:
            from segtrain.models.megatron import te_available

            if not te_available():
                raise ConfigError(
                    "megatron.fp8: needs Transformer Engine (`import transformer_engine` fails here; see tools/gpu_te.sh)"
                )
        if p.pp > 1 and cfg.model.tie_word_embeddings:
            raise ConfigError(f"model.tie_word_embeddings: tied embeddings with parallel.pp={p.pp} are not supported; untie them")

    def parallel_groups(self, cfg, layout: Layout) -> ParallelGroups:
        """megatron-core's ``parallel_state`` for the layout, CP included (collective); the groups are read from it."""
        from segtrain.models.megatron import init_model_parallel

        init_model_parallel(layout.tp, layout.pp, layout.cp, seed=cfg.seed)
        return build_groups(layout)

    def build(self, cfg, groups: ParallelGroups, device: torch.device, dtype: torch.dtype, init_from: str | None) -> nn.Module:
        """This rank's megatron stage on ``device``, its attention slots running CP when ``parallel.cp > 1``."""
        from segtrain.models.megatron import build_gpt_model

        p = cfg.parallel
        model = build_gpt_model(cfg.model, tp=p.tp, pp=p.pp, dtype=dtype, **build_options(cfg.megatron, device)).to(device)
        if init_from:
            self._load_portable(model, cfg, groups, init_from)
        self.apply_context_parallel(model, cfg, groups)
        return model

    @staticmethod
    def _load_portable(model: nn.Module, cfg, groups: ParallelGroups, path: str) -> None:
        """A portable checkpoint (directory or ``.safetensors``, HF names) into this rank's megatron shard."""
        from pathlib import Path

        from safetensors.torch import load_file

        from segtrain.checkpoint.portable import WEIGHTS_NAME

        file = Path(path) / WEIGHTS_NAME if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"init_from: no {WEIGHTS_NAME} in {path}")
        p, here = cfg.parallel, groups.coords
        shard = hf_to_megatron(load_file(str(file)), cfg.model, p.tp, p.pp)[(here["tp"], here["pp"])]
        missing, unexpected = model.load_state_dict(spelled_like(shard, model.state_dict()), strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(f"init_from {path}: missing {missing[:3]}, unexpected {unexpected[:3]} in the megatron shard")

    def deepspeed_overrides(self, cfg) -> dict:
        """With PP megatron's schedule accumulates the micro-batches (its losses divided by their number) and calls
        ``backward`` itself: DeepSpeed sees one micro-batch of ``micro x grad_accum`` and, unmanaged, only accumulates
        gradients in backward; ``engine.step()`` is the boundary that reduces them over DP x CP and updates."""
        if cfg.parallel.pp == 1:
            return {}
        return {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size * cfg.grad_accum,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
        }

    def per_token_loss(self, engine, batch: dict[str, Tensor]) -> Tensor:
        """megatron's vocab-parallel cross-entropy ``[B, T]`` at the batch's ``position_ids`` (a CP shard's absolute ones;
        default ``0..T-1``); labels clamped: ignored positions weigh 0 in the loss."""
        labels = batch["labels"]
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(labels.shape[1], device=labels.device)[None].expand_as(labels)
        return engine(batch["tokens"], positions, None, labels=labels.clamp(min=0))

    def train_step(self, engine, batches: list[dict[str, Tensor]], before_update: Callable[[], None] | None = None) -> Tensor:
        """Under PP DeepSpeed reduces the gradients in ``engine.step()``, so ``before_update`` has no place there; PP
        runs ZeRO-1, whose optimizer keeps the gradient norm itself (:mod:`segtrain.train.grad_norm`)."""
        if engine.module.config.pipeline_model_parallel_size == 1:
            new_fp8_weights(engine.module)
            return super().train_step(engine, batches, before_update)
        from megatron.core import parallel_state as ps

        if before_update is not None:
            raise NotImplementedError("before_update under PP: DeepSpeed reduces the gradients inside engine.step()")
        total = self.pipeline_forward_backward(_Stage(engine), batches)
        engine.step()
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())  # every stage reports the loss
        return total

    def pipeline_forward_backward(self, stage, batches: list[dict[str, Tensor]]) -> Tensor:
        """Forward and backward of ``batches`` through megatron's 1F1B schedule on ``stage`` (what the schedule calls:
        the engine's :class:`_Stage`, or a bare ``GPTModel``); returns the sum of the micro-batch losses (as
        :meth:`shard_loss` gives them) on the last stage, 0 on the others (float64)."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from segtrain.compat.megatron_core import cpu_collectives

        recipe, cp = self, ps.get_context_parallel_world_size()
        shards = [self.shard(b) for b in batches]

        def forward_step(data_iterator, model):
            shard = next(data_iterator)
            out = recipe.per_token_loss(model, shard)

            def loss_func(per_token):
                loss = recipe.shard_loss(per_token, shard)
                # megatron multiplies the returned loss in place by the CP size (which shard_loss has done) and divides
                # it by the micro-batch count
                return loss / cp, {"loss": loss.detach().clone()}

            return out, loss_func

        B, T = shards[0]["tokens"].shape
        shape = (T, B, stage.config.hidden_size)  # this CP rank's activations: its own shard, not seq_length / cp
        device = shards[0]["tokens"].device
        with cpu_collectives() if device.type == "cpu" else contextlib.nullcontext():
            results = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(shards),
                model=[stage],
                num_microbatches=len(shards),
                seq_length=T,
                micro_batch_size=B,
                forward_only=False,
                adjust_tensor_shapes_fn=lambda recv, send: ([shape], [shape]),
            )
        total = torch.zeros((), dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage():
            total += sum(r["loss"].double() for r in results)
        return total

    def export_state(self, engine, cfg, groups: ParallelGroups) -> dict | None:
        """Every (TP, PP) shard of DP and CP rank 0 gathered on global rank 0 and merged into HF names."""
        p, here = cfg.parallel, groups.coords
        mine = None
        if here["dp"] == here["cp"] == 0:
            state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items() if isinstance(v, torch.Tensor)}
            mine = ((here["tp"], here["pp"]), state)
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        return megatron_to_hf(dict(g for g in gathered if g is not None), cfg.model, p.tp, p.pp)


class _Stage:
    """What megatron's schedule calls: the DeepSpeed engine (its forward hooks), with the megatron config."""

    def __init__(self, engine):
        self.engine, self.config = engine, engine.module.config
        self.module = engine.module  # megatron looks up model_type etc. through ``.module``

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def set_input_tensor(self, tensor) -> None:
        self.engine.module.set_input_tensor(tensor)

    def set_is_first_microbatch(self) -> None:  # the schedule calls it (if present) before a step's first micro-batch
        new_fp8_weights(self.engine.module)


def new_fp8_weights(model) -> None:
    """Before a step's first micro-batch: Transformer Engine's FP8 layers cast their weights again (they cache the
    cast across micro-batches; without this they keep the first step's weights forever). No-op without FP8."""
    fn = getattr(model, "set_is_first_microbatch", None)
    if fn is not None:
        fn()
