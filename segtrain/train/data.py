"""Training samples for the loop: megatron-core GPT datasets over indexed data, synthetic long-range tasks, or a blend.

Sample ``i`` is a pure function of ``i`` and the seed, which is what makes resumption and DP layouts
reproducible. Each sample is a dict with ``tokens``, ``labels`` (shifted), ``loss_mask`` and ``position_ids``.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch

from segtrain.attention.documents import document_loss_mask
from segtrain.config import ConfigError
from segtrain.errors import UserError
from segtrain.loss import token_weights


class TokenIdError(UserError):
    """Training data holds a token id the model's embedding does not have; the message names the data and the step."""


class BlendedDataset(torch.utils.data.Dataset):
    """Sample ``i`` is ``synthetic[i]`` with probability ``fraction``, else ``natural[i]``.

    The choice is a hash of ``(seed, i)`` (``random.Random`` seeded with a string: the same on every
    machine), so sample ``i`` stays a pure function of ``(i, seed)`` and resumption stays exact. Both
    sources are indexed by ``i`` itself: natural samples at synthetic indices are skipped, not shifted.
    """

    def __init__(self, natural, synthetic, fraction: float, seed: int):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        self.natural, self.synthetic, self.fraction, self.seed = natural, synthetic, fraction, seed
        self.num_samples = min(len(natural), len(synthetic))

    def __len__(self) -> int:
        return self.num_samples

    def is_synthetic(self, i: int) -> bool:
        return random.Random(f"blend/{self.seed}/{i}").random() < self.fraction

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} of {self.num_samples}")
        return self.synthetic[i] if self.is_synthetic(i) else self.natural[i]


class SampleMap(torch.utils.data.Dataset):
    """A dataset whose samples pass through :meth:`apply` on the way out, each as a copy (the source's stays as it is)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.apply(dict(self.dataset[i]))

    def apply(self, sample: dict) -> dict:
        raise NotImplementedError


class PerSampleMean(SampleMap):
    """``data.loss_average: sample``: each sample's counted positions get weights that sum to 1 (``loss_mask`` scaled by
    the sample's own count). The loss (:func:`segtrain.loss.mean_loss`, a weighted mean) then is the mean over samples
    of each sample's mean, under any parallel layout, since every path weighs positions by ``loss_mask``."""

    def apply(self, sample: dict) -> dict:
        mask = sample.get("loss_mask")
        dtype = mask.dtype if mask is not None and mask.is_floating_point() else torch.float32
        weights = token_weights(sample["labels"], mask, dtype)  # in the mask's own precision
        count = weights.sum()
        sample["loss_mask"] = weights / count if count > 0 else weights
        return sample


class DocumentBoundaries(SampleMap):
    """Document mode (``model.documents``): no loss crosses a document boundary. The last token of a document that
    another follows in the sample predicts that document's first token: its ``loss_mask`` becomes 0, whatever the
    source (indexed data also masks its EOD tokens, ``eod_mask_loss``, which covers the sample's last token)."""

    def apply(self, sample: dict) -> dict:
        positions = torch.as_tensor(sample["position_ids"])
        mask = torch.as_tensor(sample["loss_mask"])
        sample["loss_mask"] = mask * document_loss_mask(positions)[0].to(mask.dtype)
        return sample


class TokenIdsInVocabulary(torch.utils.data.Dataset):
    """Each sample's ids must lie in ``[0, vocab_size)``, checked on the host (a max over the CPU tensor): on the device
    an id past the embedding is an index error deep in the model, on CUDA a device-side assert that poisons the process.
    Data tokenized with another tokenizer fails at its first bad sample, naming ``source(i, sample)`` and the step that
    reads it (sample ``i`` is read by step ``i // samples_per_step + 1``: the loop's order)."""

    def __init__(self, dataset, vocab_size: int, samples_per_step: int, source):
        self.dataset, self.vocab_size, self.samples_per_step, self.source = dataset, vocab_size, samples_per_step, source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        tokens = np.asarray(sample["tokens"])  # numpy: no thread pool to wake for a ~20 us reduction
        low, high = int(tokens.min()), max(int(tokens.max()), int(np.asarray(sample["labels"]).max()))  # labels: + the last
        if high >= self.vocab_size or low < 0:
            bad = high if high >= self.vocab_size else low
            raise TokenIdError(
                f"{self.source(i, sample)} holds token id {bad} (sample {i}, step {i // self.samples_per_step + 1}) but "
                f"model.vocab_size is {self.vocab_size}: was it tokenized with another tokenizer than the model's?"
            )
        return sample


def check_data(cfg, samples_per_step: int) -> None:
    """What the data build would refuse, checked at startup before the model is built: a tokenizer with more ids than
    ``model.vocab_size`` and a ``data.split`` that leaves a split of some prefix empty (megatron-core would hang)."""
    d = cfg.data
    if d.tokenizer is not None:
        from segtrain.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(d.tokenizer).vocab_size  # a sentencepiece file or a model directory's tokenizer
        if vocab > cfg.model.vocab_size:
            raise ConfigError(
                f"data.tokenizer: {d.tokenizer} has {vocab} ids but model.vocab_size is {cfg.model.vocab_size}: "
                "use the model's tokenizer, or a model with a vocabulary at least as large"
            )
    if d.prefixes:
        from segtrain.data.gpt import check_splits_have_documents

        check_splits_have_documents(d.prefixes, d.split, _gpt_sizes(cfg.steps * samples_per_step), field="data.split")


def build_train_dataset(cfg, num_samples: int, samples_per_step: int | None = None):
    """The training split with at least ``num_samples`` samples (megatron-core repeats epochs as needed).

    ``samples_per_step``: the global batch, so that a token id past ``model.vocab_size`` names the step reading it."""
    data = _samples(cfg, num_samples, samples_per_step or max(num_samples // cfg.steps, 1))
    if cfg.model.documents:
        data = DocumentBoundaries(data)
    return PerSampleMean(data) if cfg.data.loss_average == "sample" else data


def _samples(cfg, num_samples: int, samples_per_step: int):
    d = cfg.data
    synthetic = natural = None
    if d.synthetic is not None:
        tasks = d.synthetic.split("+")
        synthetic = TokenIdsInVocabulary(_synthetic(cfg, num_samples), cfg.model.vocab_size, samples_per_step,
                                         lambda i, _: f"data.synthetic: task {tasks[i % len(tasks)]}")  # fmt: skip
    if d.prefixes:  # a blend of several prefixes tells each sample's with dataset_id
        prefix = lambda i, sample: f"data.prefixes: {d.prefixes[int(sample.get('dataset_id', 0))]}"  # noqa: E731
        natural = TokenIdsInVocabulary(_natural(cfg, num_samples), cfg.model.vocab_size, samples_per_step, prefix)
    if natural is None or synthetic is None:
        return synthetic if natural is None else natural
    return BlendedDataset(natural, synthetic, d.synthetic_fraction, cfg.seed)


def _synthetic(cfg, num_samples: int):
    from segtrain.data.synthetic import SyntheticDataset

    d = cfg.data
    if d.tokenizer is None:
        raise ConfigError("data.tokenizer: synthetic tasks need a tokenizer to write their text")
    from segtrain.data.synthetic import SyntheticError

    try:
        return SyntheticDataset(d.synthetic.split("+"), d.tokenizer, d.seq_length, num_samples, seed=cfg.seed,
                                loss_on=d.synthetic_loss, **d.synthetic_options)  # fmt: skip
    except SyntheticError as e:
        raise ConfigError(f"data.synthetic_options: {e}") from None


def _natural(cfg, num_samples: int):
    from segtrain.data.gpt import build_gpt_datasets

    d = cfg.data
    data = list(d.prefixes) if d.weights is None else [(float(w), p) for w, p in zip(d.weights, d.prefixes)]
    cache_dir = Path(cfg.out_dir) / "data_cache"
    with _removed_if_interrupted(cache_dir):
        train, _, _ = build_gpt_datasets(
            data,
            d.seq_length,
            d.tokenizer,
            split=d.split,
            seed=cfg.seed,
            num_samples=_gpt_sizes(num_samples),
            cache_dir=cache_dir,
            # document mode reads documents from positions that restart after each EOD, and predicts nothing across one
            reset_position_ids=d.reset_position_ids or cfg.model.documents,
            eod_mask_loss=d.eod_mask_loss or cfg.model.documents,
            vocab_size=cfg.model.vocab_size,
        )
    if train is None or len(train) < num_samples:
        raise ConfigError(f"data.split: {d.split!r} leaves no training documents in {list(d.prefixes)}")
    return train


def _gpt_sizes(num_samples: int) -> tuple[int, int, int]:
    """Samples asked of megatron-core's (train, validation, test) splits: training reads only the first."""
    return (num_samples, 0, 0)


@contextlib.contextmanager
def _removed_if_interrupted(directory: Path):
    """The files megatron-core writes into ``directory`` (its index cache, with plain ``numpy.save``) are removed if the
    block ends in an exception: a stop signal can then end a long build at once without leaving a half-written index
    that the next run would load. Only rank 0 writes them (megatron-core's rule), so only rank 0 removes them."""
    import torch.distributed as dist

    def listing() -> dict[Path, tuple[int, int]]:
        files = directory.iterdir() if directory.is_dir() else ()
        return {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()}

    writes = not dist.is_initialized() or dist.get_rank() == 0
    before = listing() if writes else {}
    try:
        yield
    except BaseException:
        for path, stamp in listing().items() if writes else ():
            if before.get(path) != stamp:
                path.unlink(missing_ok=True)
        raise
