"""Evaluation records as markdown tables and plots (accuracy by distance bucket, perplexity by position)."""

from __future__ import annotations

import math
from pathlib import Path

from segtrain.eval.retrieval import BUCKETS
from segtrain.plotting import pyplot

__all__ = ["markdown", "plot_ppl", "plot_retrieval", "position_groups"]


def _label(r: dict) -> str:
    return f"{r['model']} | " if "model" in r else ""


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _pct(cell: dict | None) -> str:
    if not cell or cell.get("accuracy") is None:
        return "-"
    return f"{100 * cell['accuracy']:.0f}% ({cell['correct']}/{cell['total']})"


def position_groups(n_segments: int) -> list[tuple[int, int]]:
    """Segment-index groups for a readable table: 0, 1, 2-3, 4-7, 8-15, ... (``[lo, hi]``, inclusive)."""
    groups, lo = [], 0
    while lo < n_segments:
        hi = min(max(lo * 2 - 1, lo), n_segments - 1)
        groups.append((lo, hi))
        lo = hi + 1
    return groups


def _group_ppl(ppl: dict, lo: int, hi: int) -> str:
    rows = [r for r in ppl["segments"] if lo <= r["segment"] <= hi]
    tokens = sum(r["tokens"] for r in rows)
    if not tokens:
        return "-"
    return f"{math.exp(sum(r['nll'] * r['tokens'] for r in rows) / tokens):.2f}"


def markdown(records: list[dict]) -> str:
    """Retrieval, perplexity and prefill tables (sections only for what the records hold)."""
    done = [r for r in records if "skipped" not in r]
    head = "| model " if any("model" in r for r in done) else ""
    out = []
    retrieval = [r for r in done if r.get("retrieval")]
    if retrieval:
        out += ["### Retrieval accuracy by needle distance (exact answer, greedy)", ""]
        out.append(f"{head}| mode | length | task | " + " | ".join(BUCKETS) + " | all |")
        out.append("|" + " --- |" * (4 + len(BUCKETS) + bool(head)))
        for r in retrieval:
            for task, cells in r["retrieval"].items():
                total = {"correct": sum(c["correct"] for c in cells.values()), "total": sum(c["total"] for c in cells.values())}
                total["accuracy"] = total["correct"] / total["total"] if total["total"] else None
                row = [_pct(cells.get(b)) for b in BUCKETS] + [_pct(total)]
                out.append(f"| {_label(r)}{r['mode']} | {_length(r['length'])} | {task} | " + " | ".join(row) + " |")
        out.append("")
    ppl = [r for r in done if r.get("ppl")]
    if ppl:
        n = max(len(r["ppl"]["segments"]) for r in ppl)
        groups = position_groups(n)
        names = [f"seg {lo}" if lo == hi else f"seg {lo}-{hi}" for lo, hi in groups]
        out += [f"### Held-out perplexity by position (segments of {ppl[0]['ppl']['bucket_size']} tokens)", ""]
        out.append(f"{head}| mode | length | all | " + " | ".join(names) + " |")
        out.append("|" + " --- |" * (3 + len(groups) + bool(head)))
        for r in ppl:
            cells = [_group_ppl(r["ppl"], lo, hi) for lo, hi in groups]
            out.append(f"| {_label(r)}{r['mode']} | {_length(r['length'])} | {r['ppl']['ppl']:.2f} | " + " | ".join(cells) + " |")
        out.append("")
    prefill = [r for r in done if r.get("prefill")]
    if prefill:
        out += ["### Prefill (batch 1, segmented engine)", ""]
        out.append(f"{head}| mode | length | S | policy | time s | peak GiB | beyond weights GiB | KV cache GiB |")
        out.append("|" + " --- |" * (8 + bool(head)))
        for r in prefill:
            p = r["prefill"]
            mem = [f"{p[k]:.3f}" if k in p else "-" for k in ("peak_gib", "beyond_gib", "kv_cache_gib")]
            out.append(f"| {_label(r)}{r['mode']} | {_length(r['length'])} | {r['segment_size']} | {r['policy']} | "
                       f"{p['time_s']:.3f} | " + " | ".join(mem) + " |")  # fmt: skip
        out.append("")
    skipped = [r for r in records if "skipped" in r]
    if skipped:
        out.append(
            "Not measured: " + "; ".join(f"{_label(r)}{r['mode']} at {_length(r['length'])} ({r['skipped']})" for r in skipped)
        )
        out.append("")
    return "\n".join(out)


def _curve_name(r: dict) -> str:
    return f"{r['model'] + ' ' if 'model' in r else ''}{r['mode']} @{_length(r['length'])}"


def plot_retrieval(records: list[dict], path: str | Path) -> Path | None:
    """Accuracy by distance bucket, one panel per task, one line per (model, mode, length). None without matplotlib."""
    plt = pyplot()
    rows = [r for r in records if r.get("retrieval")]
    if plt is None or not rows:
        return None
    tasks = list(dict.fromkeys(t for r in rows for t in r["retrieval"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in rows:
            cells = r["retrieval"].get(task)
            if cells:
                ys = [None if cells[b]["accuracy"] is None else 100 * cells[b]["accuracy"] for b in BUCKETS]
                ax.plot(BUCKETS, [math.nan if y is None else y for y in ys], marker="o", label=_curve_name(r))
        ax.set(title=task, xlabel="needle distance bucket", ylabel="exact accuracy (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_ppl(records: list[dict], path: str | Path) -> Path | None:
    """Held-out perplexity per segment index, one line per (model, mode, length). None without matplotlib."""
    plt = pyplot()
    rows = [r for r in records if r.get("ppl")]
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        segs = r["ppl"]["segments"]
        ax.plot([s["segment"] for s in segs], [s["ppl"] for s in segs], marker=".", label=_curve_name(r))
    ax.set(xlabel=f"segment index ({rows[0]['ppl']['bucket_size']} tokens each)", ylabel="perplexity", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
