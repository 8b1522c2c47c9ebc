"""One evaluation: a model under each execution mode, at each length, on retrieval by distance, held-out
perplexity by position and prefill cost. Returns JSON-ready records, one per (mode, length)."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from segtrain.config import ModelConfig
from segtrain.errors import UserError
from segtrain.eval.modes import ExecutionMode, executed_as
from segtrain.eval.perplexity import heldout_sequences, position_nll, ppl_table
from segtrain.eval.prefill import prefill_cost
from segtrain.eval.retrieval import TASKS, retrieval_set, score_generated, score_teacher_forced, summarize
from segtrain.models.llama import LlamaForCausalLM
from segtrain.progress import show_progress

__all__ = ["EvalPlan", "describe_policy", "evaluate"]


@dataclass
class EvalPlan:
    """What to measure. ``tasks`` are retrieval tasks (``passkey``, ``needle``, ``recall``); ``ppl_data`` adds
    perplexity; ``bucket_size`` sets the distance and position buckets (default: the segmented mode's segment size)."""

    modes: list[ExecutionMode]
    lengths: list[int]
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    samples: int = 48
    batch_size: int = 8
    seed: int = 0
    bucket_size: int | None = None
    ppl_data: str | None = None
    ppl_sequences: int = 8
    prefill: bool = True
    generate: bool = False
    task_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown task {unknown[0]!r}; choose from {list(TASKS)}")
        for name in ("samples", "batch_size", "ppl_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be a positive integer, got {value!r}")
        if not self.lengths or any(not isinstance(n, int) or n < 2 for n in self.lengths):
            raise ValueError(f"--length: must be integers >= 2, got {self.lengths!r}")
        from segtrain.data.synthetic import task_options

        for task, options in self.task_options.items():  # the same options the model was trained with (data.synthetic_options)
            if task not in self.tasks or not isinstance(options, dict):
                raise ValueError(f"--task-options: {task!r} must be one of the evaluated tasks {self.tasks}, mapped to an object")
            unknown = sorted(set(options) - task_options(task) - {"depth"})
            if unknown or "depth" in options:  # depth is what the distance buckets set
                name = unknown[0] if unknown else "depth"
                raise ValueError(f"--task-options: {task}.{name}: not an option here (choose from "
                                 f"{sorted(task_options(task) - {'depth'})})")  # fmt: skip

    def check_lengths(self, tokenizer) -> None:
        """Every ``--length`` holds every retrieval sample of the plan (checked on the samples themselves, before any
        model work); else a one-line error naming the minimum for this tokenizer."""
        from segtrain.data.synthetic import PartEncoder, needed_length

        if not self.tasks:
            return
        enc = PartEncoder(tokenizer)
        need, task = max(
            (needed_length(task, enc, seed=self.seed, index=i, **self.task_options.get(task, {})), task)
            for task in self.tasks
            for i in range(self.samples)
        )
        if min(self.lengths) < need:
            raise UserError(
                f"--length: {min(self.lengths)} tokens are too few for the {task} task, whose samples need at least {need} "
                f"with this tokenizer; pass --length {need} or more"
            )

    def buckets_for(self, config: ModelConfig) -> int:
        if self.bucket_size:
            return self.bucket_size
        segmented = [m for m in self.modes if m.kind == "segmented"]
        return segmented[0].segment_size_for(config) if segmented else config.segment_size


def describe_policy(config: ModelConfig) -> str:
    """The policy table in a few words: ``all``, ``none`` or ``25% all + 75% none``."""
    counts = Counter(str(p) for row in config.policy_table().layers for p in row)
    total = sum(counts.values())
    if len(counts) == 1:
        return next(iter(counts))
    return " + ".join(f"{100 * n / total:.0f}% {name}" for name, n in counts.most_common())


def evaluate(
    model: LlamaForCausalLM,
    tokenizer,
    plan: EvalPlan,
    *,
    progress: bool = True,
    deadline: float | None = None,
    on_record: Callable[[dict], None] | None = None,
    cache: dict | None = None,
) -> list[dict]:
    """Records for every (length, mode) of ``plan``; each also goes to ``on_record`` as soon as it is done.

    ``deadline`` (a ``time.monotonic()`` value): records not started by then are skipped (``skipped``
    says so), so a time-boxed run still returns what it measured. ``cache`` (a dict the caller keeps)
    holds the generated samples and held-out sequences between calls that share the tokenizer and plan."""
    cache = {} if cache is None else cache
    base = model.config
    bucket = plan.buckets_for(base)
    if plan.tasks and tokenizer is None:
        raise ValueError("--tokenizer: the retrieval tasks need a tokenizer (the model dir holds none)")
    plan.check_lengths(tokenizer)
    per_length = len(plan.tasks) * plan.samples + (plan.ppl_sequences if plan.ppl_data else 0)
    bar = show_progress(total=per_length * len(plan.modes) * len(plan.lengths), desc="eval", unit="sample", enabled=progress)
    records = []
    for length in plan.lengths:
        if length > base.max_position_embeddings:
            warnings.warn(
                f"length {length} is beyond the model's max_position_embeddings={base.max_position_embeddings}: "
                "RoPE extrapolation, measured on purpose",
                stacklevel=2,
            )
        sets = {
            task: retrieval_set(
                task, tokenizer, length, plan.samples, segment_size=bucket, seed=plan.seed, options=plan.task_options.get(task)
            )  # fmt: skip
            for task in plan.tasks
        }
        sequences = heldout_sequences(plan.ppl_data, tokenizer, length, plan.ppl_sequences) if plan.ppl_data else None
        for mode in plan.modes:
            if deadline is not None and time.monotonic() > deadline:
                records.append({"mode": mode.name, "length": length, "skipped": "out of time"})
                bar.update(per_length)
                continue
            record = _evaluate_one(model, mode, length, bucket, sets, sequences, plan, bar)
            records.append(record)
            if on_record is not None:
                on_record(record)
    bar.close()
    return records


def _evaluate_one(model, mode: ExecutionMode, length: int, bucket: int, sets: dict, sequences, plan: EvalPlan, bar) -> dict:
    run = executed_as(model, mode, length)
    cfg = run.config
    record = {
        "mode": mode.name,
        "kind": mode.kind,
        "length": length,
        "segment_size": cfg.segment_size,
        "policy": describe_policy(cfg),
        "bucket_size": bucket,
        "extrapolation": length > cfg.max_position_embeddings,
        "seconds": {},
    }
    if sets:
        t0 = time.perf_counter()
        items = [item for task in plan.tasks for item in sets[task]]
        score = score_generated if plan.generate else score_teacher_forced
        score(run, items, batch_size=plan.batch_size, on_batch=bar.update)
        record["retrieval"] = summarize(items)
        record["samples"] = [item.to_dict() for item in items]
        record["seconds"]["retrieval"] = time.perf_counter() - t0
    if sequences is not None:
        t0 = time.perf_counter()
        sums, counts = position_nll(run, sequences, bucket, batch_size=plan.batch_size, on_batch=bar.update)
        record["ppl"] = ppl_table(sums, counts, bucket)
        record["seconds"]["ppl"] = time.perf_counter() - t0
    if plan.prefill:
        prompt = sequences[0, :length] if sequences is not None else _prompt(sets, length)
        record["prefill"] = prefill_cost(run, prompt, warmup=next(run.parameters()).is_cuda)  # CPU: time only, no warm-up
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def _prompt(sets: dict, length: int) -> torch.Tensor:
    for items in sets.values():
        if items:
            return torch.tensor(items[0].sample.input_ids[:length])
    return torch.arange(length) % 100 + 4  # no data given: the cost does not depend on the token values
