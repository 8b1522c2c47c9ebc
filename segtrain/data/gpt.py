"""Training samples from indexed datasets: megatron-core ``GPTDataset`` splits, blended by weight.

megatron-core does the work: it shuffles documents, cuts their concatenation (EOD-separated) into
``seq_length + 1`` token windows, caches the indices in ``cache_dir`` and blends several datasets by
weight. Sample ``i`` is a pure function of ``i``, the seed and the data, which is what makes resumption
and data-parallel layouts reproducible. Each sample is a dict of torch tensors:
``tokens``/``labels`` (int64, ``labels`` is ``tokens`` shifted by one), ``loss_mask`` (float32),
``position_ids`` (int64), plus ``dataset_id`` when blended.

On CPU without ``torch.distributed``: megatron-core's dataset code needs neither CUDA nor a process
group, and its C++ index helpers ship prebuilt in the wheel (``helpers_cpp``). One exception: a blend
of several datasets calls ``torch.distributed.get_rank()`` unguarded when its index cache is missing,
so without an initialised process group (a single process is rank 0) we answer that call with 0 while
the blend is built. With a process group, megatron-core's rank-0-first building runs unchanged.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segtrain.compat.megatron_core import single_process_rank
from segtrain.data.indexed import check_indexed
from segtrain.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from segtrain.errors import UserError


class DatasetConfigError(UserError):
    """A dataset request that cannot be built; the message names the argument."""


@dataclass
class MegatronTokenIds:
    """What ``GPTDatasetConfig.tokenizer`` needs: EOD and pad ids, the vocabulary size, an identity for the cache key.

    ``data_fingerprint`` (a digest of each ``.idx``) is part of the identity because megatron-core keys
    its index cache by path only: re-preprocessing a prefix would otherwise silently reuse indices
    built for the old files.
    """

    eod: int = EOS_ID
    pad: int = PAD_ID
    vocab_size: int | None = None
    data_fingerprint: tuple = ()
    unique_identifiers: dict = field(init=False)

    def __post_init__(self) -> None:
        self.unique_identifiers = {
            "class": "segtrain.MegatronTokenIds",
            "eod": self.eod,
            "pad": self.pad,
            "data": self.data_fingerprint,
        }

    @property
    def eos(self) -> int:
        return self.eod


def megatron_dataset_modules():
    """(GPTDataset, GPTDatasetConfig, BlendedMegatronDatasetBuilder), imported quietly."""
    with warnings.catch_warnings():  # megatron-core warns that TE/Apex are absent: irrelevant for datasets
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401  (the C++ index builders)
    except ImportError as e:
        raise RuntimeError(
            f"megatron-core's C++ dataset helpers are missing ({e}); install a megatron-core wheel (they ship prebuilt)"
        ) from None
    return GPTDataset, GPTDatasetConfig, BlendedMegatronDatasetBuilder


def parse_blend(data) -> tuple[list[str], list[float] | None]:
    """Prefixes and weights from: a prefix, a list of prefixes, ``{prefix: weight}``, or ``[(weight, prefix), ...]``."""
    if isinstance(data, (str, os.PathLike)):
        return [os.fspath(data)], None
    if isinstance(data, Mapping):
        items = [(w, p) for p, w in data.items()]
    elif isinstance(data, Sequence) and data and all(isinstance(d, (tuple, list)) and len(d) == 2 for d in data):
        items = list(data)
    elif isinstance(data, Sequence) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        return [os.fspath(d) for d in data], None
    else:
        raise DatasetConfigError(f"data: expected a prefix, a list of prefixes or (weight, prefix) pairs, got {data!r}")
    prefixes, weights = [], []
    for weight, prefix in items:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DatasetConfigError(f"data: weight for {prefix} must be a positive number, got {weight!r}")
        prefixes.append(os.fspath(prefix))
        weights.append(float(weight))
    return prefixes, weights


def build_gpt_datasets(
    data,
    seq_length: int,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    *,
    split: str = "98,2,0",
    seed: int = 1234,
    num_samples: int | Sequence[int | None] | None = None,
    cache_dir: str | os.PathLike | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    vocab_size: int | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
):
    """(train, valid, test) megatron-core datasets over ``data``; a split with no share in ``split`` is None.

    data: a prefix, a list of prefixes (blended by size), ``{prefix: weight}`` or ``[(weight, prefix)]``.
    tokenizer: a Tokenizer or its path (for EOD/pad ids and the vocabulary size); None: the fixed ids.
    num_samples: samples wanted per split, ``(train, valid, test)`` or an int for train alone (then
        one epoch of valid and test). megatron-core repeats epochs to reach a count. None: one epoch
        each; weights need counts.
    cache_dir: where megatron-core stores its sample indices (default: ``cache`` next to the first prefix).
    reset_position_ids: positions restart after each EOD. eod_mask_loss: no loss on predicting after EOD.
    reset_attention_mask: a per-sample ``[1, T, T]`` document mask (O(T^2) memory; segment attention has no
        document mask, so this is for other consumers only).
    is_built_on_rank: megatron-core's hook for which ranks build; default all.
    """
    GPTDataset, GPTDatasetConfig, Builder = megatron_dataset_modules()
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise DatasetConfigError(f"seq_length: must be a positive integer, got {seq_length!r}")
    prefixes, weights = parse_blend(data)
    sizes = _split_sizes(num_samples)
    if weights is not None and any(s is None for s in sizes):
        raise DatasetConfigError(f"num_samples: weighted blends need a sample count for every split, got {num_samples!r}")
    check_splits_have_documents(prefixes, split, sizes)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.load(tokenizer)
    ids = MegatronTokenIds(
        eod=tokenizer.eos_id if tokenizer is not None else EOS_ID,
        pad=tokenizer.pad_id if tokenizer is not None else PAD_ID,
        vocab_size=vocab_size or (tokenizer.vocab_size if tokenizer is not None else None),
        data_fingerprint=tuple(_fingerprint(p) for p in prefixes),
    )
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        tokenizer=ids,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=reset_attention_mask,  # a T x T mask per sample only when asked for
        path_to_cache=os.fspath(cache_dir or Path(prefixes[0]).parent / "cache"),
    )
    builder = Builder(GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    with single_process_rank():
        train, valid, test = builder.build()
    return train, valid, test


def _split_sizes(num_samples) -> list[int | None]:
    if num_samples is None:
        return [None, None, None]
    if isinstance(num_samples, int) and not isinstance(num_samples, bool):
        num_samples = (num_samples, None, None)
    sizes = list(num_samples)
    if len(sizes) != 3 or any(s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0) for s in sizes):
        raise DatasetConfigError(
            f"num_samples: expected an int or (train, valid, test) of ints >= 0 or None, got {num_samples!r}"
        )
    return sizes


def _split_matrix(split: str, field: str = "split") -> list[tuple[float, float] | None]:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    parts = str(split).replace("/", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise DatasetConfigError(f"{field}: expected up to three non-negative weights like '98,2,0', got {split!r}")
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(str(split)))


SPLIT_NAMES = ("train", "validation", "test")


def split_documents(split_matrix, sequences: int) -> list[int | None]:
    """How many of a dataset's ``sequences`` each split gets (None: no share), rounded as megatron-core rounds them.

    megatron-core splits GPT data by sequence (one per document, as ``segtrain data`` writes them)."""
    counts = []
    for bounds in split_matrix:
        begin, end = (int(round(b * float(sequences))) for b in bounds) if bounds is not None else (0, 0)
        counts.append(None if bounds is None else end - begin)
    return counts


def check_splits_have_documents(prefixes, split: str, sizes, *, field: str = "split") -> None:
    """megatron-core loops forever (ignoring signals) asking an empty split for samples, even for 0 of them: refuse a
    split that leaves one empty before the build, naming ``field``, the dataset and every split's document count.
    A split whose size is None (one epoch, not a count) builds empty, so it passes."""
    split_matrix = _split_matrix(split, field)
    for prefix in prefixes:
        summary = check_indexed(prefix)
        counts = split_documents(split_matrix, summary.sequences)
        unit = "documents" if summary.sequences == summary.documents else "sequences"
        for name, count, size in zip(SPLIT_NAMES, counts, sizes):
            if count == 0 and size is not None:
                each = ", ".join(f"{n} {c or 0}" for n, c in zip(SPLIT_NAMES, counts))
                raise DatasetConfigError(
                    f"{field}: {split!r} leaves the {name} split of {prefix} with 0 of its {summary.sequences} {unit} "
                    f"({each}); use {_split_without_empty(split, counts)}more {unit}"
                )


def _split_without_empty(split: str, counts) -> str:
    """The suggestion for a split that leaves some share empty: those shares 0 (while train keeps documents), or ''."""
    if not counts[0]:
        return ""
    weights = [float(w) for w in str(split).replace("/", ",").split(",")]
    weights = [w if c else 0.0 for w, c in zip(weights, counts)] + [0.0] * (3 - len(weights))
    if weights[1] == weights[2] == 0:
        return "'100,0,0' or "
    return "'" + ",".join(f"{w:g}" for w in weights) + "' or "


def _fingerprint(prefix: str) -> str:
    """A digest of the ``.idx``: the cached indices depend on the document lengths it holds and nothing else.

    Content, not mtimes, so that ranks reading copies of the same files agree on the cache key."""
    with open(f"{prefix}.idx", "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()
