"""Synthetic retrieval by distance: needles placed in the query's own segment, the previous one, or older history.

Each sample of a task (:mod:`segtrain.data.synthetic`) gets a target bucket (round robin over
:data:`BUCKETS`); its asked-for needle(s) are placed so that they start in that bucket relative to
the segment of the query (the position that predicts the answer's first token). The bucket reported
is the one the needle really landed in, measured on the token spans.

Scoring is exact. Greedy decoding writes the answer iff, teacher-forced, the argmax at every answer
position is the next answer token; segtrain's parallel forward equals its segmented prefill and
decode (tests prove it), so one batched forward per sample scores what generation would
(:func:`score_teacher_forced`). :func:`score_generated` runs real greedy generation through
:class:`~segtrain.inference.SegmentedEngine` (slower; a test checks that both agree).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from segtrain.data.synthetic import TASKS, PartEncoder, SyntheticSample, make_sample
from segtrain.models.llama import LlamaForCausalLM

__all__ = [
    "BUCKETS",
    "TASKS",
    "Answer",
    "RetrievalItem",
    "bucket_of",
    "retrieval_set",
    "score_generated",
    "score_teacher_forced",
    "summarize",
]

BUCKETS = ("own", "previous", "history")


def bucket_of(query: int, needle_start: int, segment_size: int) -> str:
    """Where a needle starting at ``needle_start`` lies for a query at ``query``: own, previous segment, or history."""
    back = query // segment_size - needle_start // segment_size
    return BUCKETS[min(max(back, 0), 2)]


@dataclass
class Answer:
    """One answer span ``[start, end)`` of a sample, the needle it needs, and (after scoring) whether it came out."""

    start: int
    end: int
    needle_start: int
    bucket: str
    correct: bool | None = None

    @property
    def distance(self) -> int:
        """Tokens from the needle's start to the query (the position that predicts the answer's first token)."""
        return self.start - 1 - self.needle_start


@dataclass
class RetrievalItem:
    task: str
    index: int
    target: str  # the bucket the placement aimed at
    sample: SyntheticSample
    answers: list[Answer] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "index": self.index,
            "target": self.target,
            "answers": [
                {"bucket": a.bucket, "distance": a.distance, "correct": a.correct, "text": text}
                for a, text in zip(self.answers, self.sample.answers)
            ],
        }


def _answers(sample: SyntheticSample, segment_size: int) -> list[Answer]:
    out = []
    for (start, end), text in zip(sample.answer_spans, sample.answers):
        needles = [n for n in sample.needles if n.queried and n.value in text] or [n for n in sample.needles if n.queried]
        oldest = min(n.start for n in needles)
        out.append(Answer(start, end, oldest, bucket_of(start - 1, oldest, segment_size)))
    return out


def _queried_start(sample: SyntheticSample) -> int:
    return min(n.start for n in sample.needles if n.queried)


def _region(target: str, query: int, segment_size: int, first: int, width: int) -> tuple[int, int] | None:
    """Start positions ``[lo, hi]`` where a needle of ``width`` tokens lies wholly in ``target`` for ``query``."""
    own = query // segment_size * segment_size
    lo, hi = {
        "own": (own, query - width),
        "previous": (own - segment_size, own - width),
        "history": (first, own - segment_size - width),
    }[target]
    lo = max(lo, first)
    return (lo, hi) if lo <= hi else None


def placed_sample(
    task: str, enc: PartEncoder, length: int, *, target: str, segment_size: int, seed: int, index: int, options: dict
) -> tuple[SyntheticSample, bool]:
    """Sample ``index`` of ``task`` with its asked-for needle(s) starting in ``target``; ``(sample, placed)``.

    The needle's position follows from ``depth`` (a fraction of the filler) only up to the lengths of the
    needles before it, so the depth is corrected from the measured position (a few regenerations).
    ``placed`` is False when the bucket cannot hold the needle at this length (the sample is then where it fell).
    """

    def make(depth: float) -> SyntheticSample:
        return make_sample(task, enc, length, seed=seed, index=index, depth=depth, **options)

    probe = make(0.0)
    first = _queried_start(probe)  # where the filler starts
    width = max(n.end for n in probe.needles if n.queried) - first
    filler = probe.answer_spans[0][0] - first - sum(n.end - n.start for n in probe.needles)  # tail included: approximate
    query = probe.answer_spans[0][0] - 1
    region = _region(target, query, segment_size, first, width)
    if region is None:
        return probe, False
    rng = random.Random(f"placement/{task}/{seed}/{index}/{target}")
    goal = rng.randint(*region)
    depth, sample = 0.0, probe
    for _ in range(4):
        depth = min(max(depth + (goal - _queried_start(sample)) / max(filler, 1), 0.0), 1.0)
        sample = make(depth)
        start = _queried_start(sample)
        if region[0] <= start <= region[1]:
            return sample, True
    return sample, False


def retrieval_set(
    task: str,
    tokenizer,
    length: int,
    num_samples: int,
    *,
    segment_size: int,
    seed: int = 0,
    options: dict | None = None,
    buckets: Sequence[str] = BUCKETS,
) -> list[RetrievalItem]:
    """``num_samples`` samples of ``task``, exactly ``length`` tokens each, targets round robin over ``buckets``."""
    if task not in TASKS:
        raise ValueError(f"task: must be one of {TASKS}, got {task!r}")
    enc = tokenizer if isinstance(tokenizer, PartEncoder) else PartEncoder(tokenizer)
    items = []
    for i in range(num_samples):
        target = buckets[i % len(buckets)]
        sample, _ = placed_sample(task, enc, length, target=target, segment_size=segment_size, seed=seed, index=i,
                                  options=dict(options or {}))  # fmt: skip
        items.append(RetrievalItem(task, i, target, sample, _answers(sample, segment_size)))
    return items


def _batches(items: Sequence, size: int):
    for a in range(0, len(items), size):
        yield items[a : a + size]


@torch.no_grad()
def score_teacher_forced(
    model: LlamaForCausalLM, items: Sequence[RetrievalItem], *, batch_size: int = 8, pad_batches: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> None:  # fmt: skip
    """Sets ``answer.correct`` for every answer: one forward per sample, logits only at answer positions.

    ``pad_batches`` repeats the last sample to fill the last batch, so every forward has the same shape
    (compiled attention kernels are specialised on shapes)."""
    device = next(model.parameters()).device
    for batch in _batches(list(items), batch_size):
        rows = list(batch) + ([batch[-1]] * (batch_size - len(batch)) if pad_batches else [])
        ids = torch.tensor([r.sample.input_ids for r in rows], dtype=torch.long, device=device)
        spans = [[(a.start, a.end) for a in r.answers] for r in rows]
        positions = [[t - 1 for s, e in sp for t in range(s, e)] for sp in spans]
        width = max(len(p) for p in positions)
        index = torch.tensor([p + [0] * (width - len(p)) for p in positions], dtype=torch.long, device=device)
        predicted = model(ids, logits_positions=index).argmax(-1).cpu()
        for row, item in enumerate(batch):
            k = 0
            for answer in item.answers:
                n = answer.end - answer.start
                want = torch.tensor(item.sample.input_ids[answer.start : answer.end])
                answer.correct = bool(torch.equal(predicted[row, k : k + n], want))
                k += n
        if on_batch is not None:
            on_batch(len(batch))


def score_generated(
    model: LlamaForCausalLM, items: Sequence[RetrievalItem], *, batch_size: int = 8, on_batch: Callable[[int], None] | None = None
) -> None:
    """Sets ``answer.correct`` by greedy generation from each answer's prompt (segmented prefill, then decoding)."""
    from segtrain.inference import SegmentedEngine

    engine = SegmentedEngine(model)
    for batch in _batches(list(items), batch_size):
        jobs = [(item, a) for item in batch for a in item.answers]
        out = engine.generate(
            [item.sample.input_ids[: a.start] for item, a in jobs], max_new_tokens=max(a.end - a.start for _, a in jobs)
        )
        for (item, a), tokens in zip(jobs, out.tokens):
            a.correct = tokens[: a.end - a.start] == item.sample.input_ids[a.start : a.end]
        if on_batch is not None:
            on_batch(len(batch))


def summarize(items: Sequence[RetrievalItem]) -> dict[str, dict[str, dict]]:
    """``{task: {bucket: {"correct", "total", "accuracy"}}}`` over scored answers (accuracy None when a bucket is empty)."""
    out: dict[str, dict[str, dict]] = {}
    for item in items:
        per = out.setdefault(item.task, {b: {"correct": 0, "total": 0} for b in BUCKETS})
        for a in item.answers:
            per[a.bucket]["total"] += 1
            per[a.bucket]["correct"] += int(bool(a.correct))
    for per in out.values():
        for cell in per.values():
            cell["accuracy"] = cell["correct"] / cell["total"] if cell["total"] else None
    return out
