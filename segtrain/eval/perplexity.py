"""Perplexity of held-out text by position: how much a model gains from (or loses with) distant context.

Held-out documents are joined in their stored order (each ends with EOD), so a long sequence keeps
the structure neighbouring documents share, and cut into non-overlapping sequences of ``length + 1``
tokens. Per-token cross-entropy comes from the model's own chunked loss (whole-sequence logits never
exist), summed per position bucket (one bucket per segment index).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from segtrain.models.llama import LlamaForCausalLM

__all__ = ["heldout_sequences", "position_nll", "ppl_table"]


class PerplexityDataError(ValueError):
    """Held-out text that cannot give the requested sequences; the message names the source."""


def _token_stream(source: str | Path, tokenizer, needed: int) -> np.ndarray:
    """At least ``needed`` tokens (fewer if the source is shorter) from an indexed prefix or jsonl/text files."""
    text = str(source)
    prefix = text[:-4] if text.endswith((".bin", ".idx")) else text
    if Path(prefix + ".idx").is_file():
        from segtrain.data.indexed import read_indexed

        docs, parts, total = read_indexed(prefix), [], 0
        for i in range(len(docs)):
            parts.append(np.asarray(docs[i], dtype=np.int64))
            total += len(parts[-1])
            if total >= needed:
                break
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    path = Path(source)
    if not path.exists():
        raise PerplexityDataError(f"--ppl-data: {source} is neither an indexed prefix (PREFIX.idx) nor a file")
    if tokenizer is None:
        raise PerplexityDataError(f"--ppl-data: {source} is text; give --tokenizer to encode it")
    from segtrain.data.documents import iter_documents

    eos = getattr(tokenizer, "eos_id", None)
    parts, total = [], 0
    for doc in iter_documents(path):
        ids = list(tokenizer.encode(doc)) + ([eos] if eos is not None else [])
        parts.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if total >= needed:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def heldout_sequences(source: str | Path, tokenizer, length: int, count: int) -> torch.Tensor:
    """``[n, length + 1]`` token ids (``n = count``, or fewer when the text runs out; at least one)."""
    stream = _token_stream(source, tokenizer, count * (length + 1))
    n = min(count, len(stream) // (length + 1))
    if n < 1:
        raise PerplexityDataError(f"--ppl-data: {source} holds {len(stream)} tokens, fewer than one sequence of {length + 1}")
    return torch.from_numpy(stream[: n * (length + 1)].reshape(n, length + 1).copy())


@torch.no_grad()
def position_nll(
    model: LlamaForCausalLM,
    sequences: torch.Tensor,
    bucket_size: int,
    *,
    batch_size: int = 8,
    pad_batches: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(nll_sum, tokens)`` per position bucket ``t // bucket_size`` over ``sequences [n, T + 1]`` (float64 sums)."""
    device = next(model.parameters()).device
    T = sequences.shape[1] - 1
    n_buckets = math.ceil(T / bucket_size)
    bucket = torch.arange(T) // bucket_size
    sums, counts = np.zeros(n_buckets), np.zeros(n_buckets, dtype=np.int64)
    for a in range(0, len(sequences), batch_size):
        batch = sequences[a : a + batch_size]
        real = len(batch)
        if pad_batches and real < batch_size:
            batch = torch.cat([batch, batch[-1:].expand(batch_size - real, -1)])
        batch = batch.to(device)
        ce = model(batch[:, :-1], labels=batch[:, 1:], reduction="none")[:real].double().cpu()
        sums += torch.zeros(n_buckets, dtype=torch.float64).index_add_(0, bucket, ce.sum(0)).numpy()
        counts += np.bincount(bucket.numpy(), minlength=n_buckets) * real
        if on_batch is not None:
            on_batch(real)
    return sums, counts


def ppl_table(sums: np.ndarray, counts: np.ndarray, bucket_size: int) -> dict:
    """JSON-ready: per segment index ``{"segment", "start", "tokens", "nll", "ppl"}``, and the overall values."""
    rows = [
        {"segment": i, "start": i * bucket_size, "tokens": int(c), "nll": s / c, "ppl": math.exp(s / c)}
        for i, (s, c) in enumerate(zip(sums.tolist(), counts.tolist()))
        if c
    ]
    total = float(sums.sum()) / max(int(counts.sum()), 1)
    return {"bucket_size": bucket_size, "segments": rows, "nll": total, "ppl": math.exp(total), "tokens": int(counts.sum())}
