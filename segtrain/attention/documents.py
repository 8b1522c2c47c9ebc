"""Documents of a packed sequence (DESIGN.md §1 "Documents"), read from ``position_ids`` that restart at 0.

In document mode each document of a packed row runs segment attention as if it were alone: its segments
follow its own positions (``t // S`` restarts with it) and it sees no key of another document, so a
document gets in a packed batch the outputs and gradients it gets alone (and at inference, where one
prompt is one document). Backends either run each document as its own call (:func:`per_document`) or
put the document into their mask (flex, flash).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Documents", "per_document", "document_loss_mask"]


@dataclass(frozen=True, eq=False)
class Documents:
    """Where the documents of each row start and end, and each token's position in its document.

    ``spans[b]``: ``(start, end)`` of each document of row ``b``; ``positions [B, T]`` (int64): position of each
    token in its document; ``ids [B, T]`` (int64): index of each token's document in its row. ``cache`` holds what
    backends derive from the layout (block masks), shared by the layers of one forward.
    """

    spans: tuple[tuple[tuple[int, int], ...], ...]
    positions: Tensor
    ids: Tensor
    cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_position_ids(cls, position_ids: Tensor) -> Documents:
        """A document starts at every 0 of ``position_ids [B, T]`` (or ``[T]``); elsewhere positions count up by one.

        A row may begin inside a document (a context-parallel shard after the first: :attr:`continued`)."""
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]
        pos = pos.to(torch.int64)
        starts = pos == 0
        bad = ~starts[:, 1:] & (pos[:, 1:] != pos[:, :-1] + 1)
        if bool(bad.any()) or bool((pos[:, 0] < 0).any()):
            row, col = (int(x) for x in bad.nonzero()[0]) if bool(bad.any()) else (int((pos[:, 0] < 0).nonzero()[0, 0]), -1)
            raise ValueError(
                f"position_ids row {row}, offset {col + 1}: in document mode a document starts at position 0 and "
                f"positions count up by one within it (got {pos[row, max(0, col) : col + 3].tolist()} there)"
            )
        starts[:, 0] = True
        T = pos.shape[1]
        spans = []
        for row in starts.cpu().tolist():
            first = [t for t, s in enumerate(row) if s]
            spans.append(tuple(zip(first, first[1:] + [T])))
        return cls(tuple(spans), pos, starts.to(torch.int64).cumsum(1) - 1)

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    @property
    def continued(self) -> bool:
        """Some row begins inside a document that began before it (only a context-parallel shard may)."""
        return bool((self.positions[:, 0] != 0).any())

    def is_one_stream(self) -> bool:
        """Every row is a single document from its start: document mode computes what one stream computes."""
        return all(len(row) == 1 for row in self.spans) and not self.continued

    def rows(self, batch: int) -> Documents:
        """This layout for ``batch`` rows (a single-row layout applies to every row)."""
        if len(self.spans) == batch:
            return self
        if len(self.spans) != 1:
            raise ValueError(f"documents cover {len(self.spans)} rows, the batch has {batch}")
        key = ("rows", batch)  # one object per batch size, so what backends cache on it is built once per forward
        if key not in self.cache:
            self.cache[key] = Documents(self.spans * batch, self.positions.expand(batch, -1), self.ids.expand(batch, -1))
        return self.cache[key]


def per_document(
    run: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor, documents: Documents
) -> Tensor:
    """``run`` on each document's slice of ``q, k, v [B, H, T, D]`` alone, the outputs joined back in place.

    Rows with the same layout run together (the usual case: one layout, or one row).
    """
    documents = documents.rows(q.shape[0])
    groups: dict[tuple, list[int]] = {}
    for b, spans in enumerate(documents.spans):
        groups.setdefault(spans, []).append(b)
    outs = {}
    for spans, rows in groups.items():
        index = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else torch.tensor(rows)
        qs, ks, vs = (t[index] for t in (q, k, v))
        parts = [run(qs[:, :, a:e], ks[:, :, a:e], vs[:, :, a:e]) for a, e in spans]
        out = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
        for i, b in enumerate(rows):
            outs[b] = out[i : i + 1]
    if len(groups) == 1:
        return out
    return torch.cat([outs[b] for b in range(q.shape[0])], 0)


def document_loss_mask(position_ids: Tensor) -> Tensor:
    """``[B, T]`` float: 0 at the last token of each document that another document follows in the row.

    Its label is the next document's first token, which document mode never predicts from the previous document
    (the row's last token keeps its label: the data's ``eod_mask_loss`` masks an EOD there).
    """
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    mask = torch.ones(pos.shape, dtype=torch.float32, device=pos.device)
    mask[:, :-1] = (pos[:, 1:] != 0).float()
    return mask
