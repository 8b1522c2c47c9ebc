"""Synthetic long-range retrieval tasks with exact answers, at any length in tokens.

Tasks (``TASKS``):

- ``passkey``: a 5-digit pass key hidden once in repetitive filler; the prompt ends asking for it.
- ``needle``: RULER-style multi-key needle-in-a-haystack: several "special magic number for KEY"
  needles (the non-queried ones are distractors) in prose-like filler; one or more keys are asked for.
- ``recall``: multi-query associative recall: many ``KEY: VALUE.`` pairs scattered through filler,
  then several keys are listed and each value must follow its key.

A sample is built in token space from text parts joined by single spaces, each part encoded on its
own (with its leading space). With segtrain's tokenizer (no dummy prefix, pieces never cross a space
boundary) this equals encoding the joined text, so ``prompt`` and ``input_ids`` agree; the ids are
canonical either way. Filler is added word by word until the exact token count is reached, so
``len(input_ids) == seq_length`` and every needle sits at a known token span. Samples depend only on
(task, seed, index, options): ``random.Random`` seeded with a string is the same on every machine.

``SyntheticDataset`` serves them as training samples shaped like the GPT datasets' (``tokens``,
``labels``, ``loss_mask`` on the answer tokens only, ``position_ids``); ``make_sample`` and
``eval_set`` give the full records for evaluation (generate from ``prompt_ids``, compare with
``answer``; or score the ``loss_mask`` positions teacher-forced).
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from segtrain.errors import UserError

TASKS = ("passkey", "needle", "recall")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_PROSE = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not but what all "
    "were when we there can an your which their said if do will each about how up out them then she many some so "
    "these would other into has more her two like him see time could no make than first been its who now people my "
    "made over did down only way find use may water long little very after words called just where most know get "
    "through back much before go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take why things help put "
    "years different away again off went old number great tell men say small every found still between name should "
    "home big give air line set own under read last never us left end along while might next sound below saw "
    "something thought both few those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life enough took sometimes four "
    "head above kind began almost live page got earth need far hand high year mother light parts country father let "
    "night following picture being study second eyes soon times story boys since white days ever paper hard near "
    "sentence better best across during today others however sure means knew try told young miles sun ways thing "
    "whole hear example heard several change answer room sea against top turned learn point city play toward five "
    "using himself usually"
)
PROSE_WORDS = _PROSE.split()
_ADJECTIVES = (
    "amber brave calm dusty eager faint gentle hollow icy jolly keen lucky misty noble odd pale quick rusty silent "
    "tidy urban vivid wild young zesty bold crisp damp early fancy grand hasty idle jagged kind lofty merry neat"
)
ADJECTIVES = _ADJECTIVES.split()
_NOUNS = (
    "anchor badger candle dolphin ember falcon garden harbor island jackal kettle lantern meadow nectar orchard "
    "pebble quarry river saddle thistle umbrella valley walrus yarrow zephyr beacon cactus donkey engine fjord "
    "glacier hammer igloo jungle koala"
)
NOUNS = _NOUNS.split()
ONE_TOKEN_CANDIDATES = ("a", "the", "is", "of", "to", "and", "in", "it", ".", ",", "I", "s", "e", "t")


class SyntheticError(UserError):
    """A synthetic-task request that cannot be met; the message names the argument."""


class TooShort(SyntheticError):
    """``seq_length`` cannot hold a sample; ``needed`` is the fewest tokens that can (the sample without filler)."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class Needle:
    """A fact placed in the haystack: ``input_ids[start:end]`` encodes ``text``, which holds ``key`` and ``value``."""

    key: str
    value: str
    start: int
    end: int
    queried: bool
    text: str


@dataclass
class SyntheticSample:
    task: str
    input_ids: list[int]  # exactly seq_length tokens: prompt, then the answer(s)
    loss_mask: list[int]  # 1 on answer tokens
    answers: list[str]  # one per answer span, in order
    answer_spans: list[tuple[int, int]]  # token spans of the answers in input_ids
    needles: list[Needle]
    prompt: str  # the text of prompt_ids (without BOS)

    @property
    def prompt_ids(self) -> list[int]:
        """Everything before the first answer: what a model is given at evaluation."""
        return self.input_ids[: self.answer_spans[0][0]]

    @property
    def answer(self) -> str:
        """The expected text right after ``prompt`` (for ``recall``: only the first value; see ``answers``)."""
        return self.answers[0]

    def to_dict(self) -> dict:
        return {**asdict(self), "prompt_ids": self.prompt_ids}


class PartEncoder:
    """Encodes text parts (cached) and tells which filler word costs exactly one token.

    ``tokenizer``: anything with ``encode(text) -> ids`` and ``bos_id`` (a segtrain Tokenizer), or its path."""

    def __init__(self, tokenizer):
        if isinstance(tokenizer, (str, os.PathLike)):  # a path, as configs name tokenizers
            from segtrain.data.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(tokenizer)
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}
        self._one_token_word: str | None = None

    def encode(self, part: str, *, first: bool) -> list[int]:
        text = part if first else " " + part
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = list(self.tokenizer.encode(text))
        return ids

    @property
    def one_token_word(self) -> str:
        if self._one_token_word is None:
            for word in ONE_TOKEN_CANDIDATES:
                if len(self.encode(word, first=False)) == 1:
                    self._one_token_word = word
                    break
            else:
                raise SyntheticError(
                    f"tokenizer: none of {ONE_TOKEN_CANDIDATES} is a single token after a space; cannot fill exactly"
                )
        return self._one_token_word


class _Builder:
    """Appends parts to a token sequence and records their spans."""

    def __init__(self, enc: PartEncoder, bos_id: int | None):
        self.enc = enc
        self.ids: list[int] = [] if bos_id is None else [bos_id]
        self.texts: list[str] = []

    def add(self, part: str) -> tuple[int, int]:
        start = len(self.ids)
        self.ids += self.enc.encode(part, first=not self.texts)
        self.texts.append(part)
        return start, len(self.ids)

    def cost(self, part: str) -> int:
        return len(self.enc.encode(part, first=not self.texts))

    def fill(self, n_tokens: int, words: Iterator[str]) -> None:
        """Exactly ``n_tokens`` more tokens of filler: whole words; a one-token word where the next would overshoot."""
        target = len(self.ids) + n_tokens
        while len(self.ids) < target:
            word = next(words)
            if len(self.ids) + self.cost(word) > target:
                word = self.enc.one_token_word
            self.add(word)

    @property
    def text(self) -> str:
        return " ".join(self.texts)


def _noise_words() -> Iterator[str]:
    words = NOISE.split()
    while True:
        yield from words


def _prose_words(rng: random.Random) -> Iterator[str]:
    """Random sentences of common words: varied filler that a model cannot learn to skip by rote."""
    while True:
        n = rng.randint(6, 14)
        sentence = [rng.choice(PROSE_WORDS) for _ in range(n)]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        yield from sentence


def _filler(kind: str, rng: random.Random) -> Iterator[str]:
    if kind == "noise":
        return _noise_words()
    if kind == "prose":
        return _prose_words(rng)
    raise SyntheticError(f"filler: must be 'noise' or 'prose', got {kind!r}")


def _keys(rng: random.Random, n: int) -> list[str]:
    if n > len(ADJECTIVES) * len(NOUNS):
        raise SyntheticError(f"num_keys: at most {len(ADJECTIVES) * len(NOUNS)} distinct keys, got {n}")
    pairs = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), n)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]


def _numbers(rng: random.Random, n: int, digits: int) -> list[str]:
    low = 10 ** (digits - 1)
    return [str(v) for v in rng.sample(range(low, 10 * low), n)]


def _layout(
    task: str,
    enc: PartEncoder,
    seq_length: int,
    *,
    bos_id: int | None,
    head: list[str],
    needles: list[tuple[str, str, str, bool]],
    depths: list[float],
    tail: list[tuple[str, str]],
    filler: Iterator[str],
) -> SyntheticSample:
    """Places ``head``, filler with ``needles`` (text, key, value, queried) at ``depths`` (fractions of the filler),
    then ``tail``: (question, answer) part pairs. Answers are loss-masked; the length is exact."""
    probe = _Builder(enc, bos_id)
    for part in head:
        probe.add(part)
    for text, *_ in needles:
        probe.add(text)
    for question, answer in tail:
        probe.add(question)
        probe.add(answer)
    n_filler = seq_length - len(probe.ids)
    if n_filler < 0:
        raise TooShort(
            f"seq_length: {seq_length} tokens are too few for this {task} sample (it needs {len(probe.ids)} without filler)",
            len(probe.ids),
        )

    b = _Builder(enc, bos_id)
    for part in head:
        b.add(part)
    filler_start = len(b.ids)
    placed: list[Needle] = []
    for (text, key, value, queried), depth in sorted(zip(needles, depths), key=lambda nd: nd[1]):
        b.fill(filler_start + round(depth * n_filler) - (len(b.ids) - sum(n.end - n.start for n in placed)), filler)
        start, end = b.add(text)
        placed.append(Needle(key, value, start, end, queried, text))
    b.fill(n_filler - (len(b.ids) - filler_start - sum(n.end - n.start for n in placed)), filler)
    spans, answers, prompt = [], [], None
    for question, answer in tail:
        b.add(question)
        prompt = b.text if prompt is None else prompt
        spans.append(b.add(answer))
        answers.append(answer)
    assert len(b.ids) == seq_length, (len(b.ids), seq_length)
    mask = [0] * seq_length
    for s, e in spans:
        mask[s:e] = [1] * (e - s)
    return SyntheticSample(task, b.ids, mask, answers, spans, sorted(placed, key=lambda n: n.start), prompt)


def passkey_sample(
    tokenizer,
    seq_length: int,
    *,
    seed: int = 0,
    index: int = 0,
    depth: float | None = None,
    max_depth: float = 1.0,
    digits: int = 5,
    bos: bool = True,
) -> SyntheticSample:
    """One pass key in noise filler, at ``depth`` (0..1 of the filler; default: random up to ``max_depth``, which keeps
    the key at least ``1 - max_depth`` of the filler away from the question)."""
    rng = random.Random(f"passkey/{seed}/{index}")
    enc = tokenizer if isinstance(tokenizer, PartEncoder) else PartEncoder(tokenizer)
    (key,) = _numbers(rng, 1, digits)
    depth = rng.random() * _fraction("max_depth", max_depth) if depth is None else _fraction("depth", depth)
    return _layout(
        "passkey",
        enc,
        seq_length,
        bos_id=enc.tokenizer.bos_id if bos else None,
        head=[
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there."
        ],
        needles=[(f"The pass key is {key}. Remember it. {key} is the pass key.", "pass key", key, True)],
        depths=[depth],
        tail=[("What is the pass key? The pass key is", key)],
        filler=_filler("noise", rng),
    )


def needle_sample(
    tokenizer,
    seq_length: int,
    *,
    seed: int = 0,
    index: int = 0,
    num_keys: int = 4,
    num_queries: int = 1,
    digits: int = 7,
    filler: str = "prose",
    bos: bool = True,
    depth: float | None = None,
) -> SyntheticSample:
    """``num_keys`` magic-number needles at random depths; ``num_queries`` of them are asked for, the rest distract.
    ``depth`` (0..1 of the filler) places the asked-for needles there, side by side (evaluation by distance)."""
    if not 1 <= num_queries <= num_keys:
        raise SyntheticError(f"num_queries: must be between 1 and num_keys={num_keys}, got {num_queries}")
    rng = random.Random(f"needle/{seed}/{index}")
    enc = tokenizer if isinstance(tokenizer, PartEncoder) else PartEncoder(tokenizer)
    keys, values = _keys(rng, num_keys), _numbers(rng, num_keys, digits)
    asked = sorted(rng.sample(range(num_keys), num_queries))
    needles = [
        (f"One of the special magic numbers for {k} is: {v}.", k, v, i in asked) for i, (k, v) in enumerate(zip(keys, values))
    ]
    asked_keys, asked_values = [keys[i] for i in asked], [values[i] for i in asked]
    if num_queries == 1:
        question = (
            f"What is the special magic number for {asked_keys[0]} mentioned in the provided text? "
            f"The special magic number for {asked_keys[0]} mentioned in the provided text is"
        )
    else:
        names = _join_and(asked_keys)
        question = (
            f"What are all the special magic numbers for {names} mentioned in the provided text? "
            f"The special magic numbers for {names} mentioned in the provided text are"
        )
    return _layout(
        "needle",
        enc,
        seq_length,
        bos_id=enc.tokenizer.bos_id if bos else None,
        head=[
            "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards."
        ],
        needles=needles,
        depths=_depths(rng, needles, depth),
        tail=[(question, ", ".join(asked_values))],
        filler=_filler(filler, rng),
    )


def recall_sample(
    tokenizer,
    seq_length: int,
    *,
    seed: int = 0,
    index: int = 0,
    num_pairs: int = 16,
    num_queries: int = 4,
    digits: int = 4,
    filler: str = "prose",
    bos: bool = True,
    depth: float | None = None,
) -> SyntheticSample:
    """``num_pairs`` ``KEY: VALUE.`` pairs through the filler; then ``num_queries`` keys, each followed by its value.
    ``depth`` (0..1 of the filler) places the asked-for pairs there, side by side (evaluation by distance)."""
    if not 1 <= num_queries <= num_pairs:
        raise SyntheticError(f"num_queries: must be between 1 and num_pairs={num_pairs}, got {num_queries}")
    rng = random.Random(f"recall/{seed}/{index}")
    enc = tokenizer if isinstance(tokenizer, PartEncoder) else PartEncoder(tokenizer)
    keys, values = _keys(rng, num_pairs), _numbers(rng, num_pairs, digits)
    asked = rng.sample(range(num_pairs), num_queries)  # asked in random order, not placement order
    pairs = [(f"{k}: {v}.", k, v, i in asked) for i, (k, v) in enumerate(zip(keys, values))]
    tail = [(f"Now the value of each key. {keys[asked[0]]}:", values[asked[0]])]
    tail += [(f"{keys[i]}:", values[i]) for i in asked[1:]]
    return _layout(
        "recall",
        enc,
        seq_length,
        bos_id=enc.tokenizer.bos_id if bos else None,
        head=["Memorize each key and its value. You will be asked for the values at the end."],
        needles=pairs,
        depths=_depths(rng, pairs, depth),
        tail=tail,
        filler=_filler(filler, rng),
    )


SAMPLERS = {"passkey": passkey_sample, "needle": needle_sample, "recall": recall_sample}


def make_sample(task: str, tokenizer, seq_length: int, *, seed: int = 0, index: int = 0, **options) -> SyntheticSample:
    """Sample ``index`` of ``task`` (see ``TASKS``); ``options`` go to the task's sampler."""
    if task not in SAMPLERS:
        raise SyntheticError(f"task: must be one of {TASKS}, got {task!r}")
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise SyntheticError(f"seq_length: must be a positive integer, got {seq_length!r}")
    unknown = set(options) - task_options(task)
    if unknown:
        raise SyntheticError(f"{sorted(unknown)[0]}: not an option of task {task!r} (it takes {sorted(task_options(task))})")
    return SAMPLERS[task](tokenizer, seq_length, seed=seed, index=index, **options)


def needed_length(task: str, tokenizer, *, seed: int = 0, index: int = 0, **options) -> int:
    """The fewest tokens that hold sample ``index`` of ``task`` (its parts without filler; it varies a little by
    sample), so a caller can name the minimum length before any work."""
    try:
        make_sample(task, tokenizer, 1, seed=seed, index=index, **options)
    except TooShort as e:
        return e.needed
    return 1


def task_options(task: str) -> set[str]:
    """The keyword options ``task``'s sampler takes (besides seed and index)."""
    params = inspect.signature(SAMPLERS[task]).parameters
    return {name for name, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"seed", "index"}


def parse_task_options(text: str, flag: str = "--task-options") -> dict:
    """The JSON of a ``--task-options`` flag: an object mapping tasks to their options (``data.synthetic_options``'s
    shape, ``{"passkey": {"digits": 2}}``); which tasks and options are allowed is the caller's check."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SyntheticError(f"{flag}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise SyntheticError(f"{flag}: expected a JSON object mapping tasks to options, got {text!r}")
    return value


def eval_set(task: str, tokenizer, seq_length: int, num_samples: int, *, seed: int = 0, **options) -> list[SyntheticSample]:
    """``num_samples`` samples (indices 0..n-1) of ``task``: a fixed evaluation set for a seed."""
    enc = PartEncoder(tokenizer)
    return [make_sample(task, enc, seq_length, seed=seed, index=i, **options) for i in range(num_samples)]


class SyntheticDataset(torch.utils.data.Dataset):
    """Training samples shaped like the GPT datasets': ``seq_length + 1`` generated tokens give ``tokens`` and
    ``labels`` (shifted by one), ``loss_mask`` is 1 where the label is an answer token (``loss_on="answers"``) or
    everywhere (``"all"``: the filler's own copying, such as the passkey sentence's repeated key, teaches the
    induction that retrieval needs), ``position_ids`` count up. ``tasks`` is one task or several (sample ``i`` uses
    ``tasks[i % len(tasks)]``)."""

    def __init__(
        self,
        tasks: str | Sequence[str],
        tokenizer,
        seq_length: int,
        num_samples: int,
        *,
        seed: int = 0,
        loss_on: str = "answers",
        **options,
    ):
        if loss_on not in ("answers", "all"):
            raise SyntheticError(f"loss_on: must be 'answers' or 'all', got {loss_on!r}")
        self.loss_on = loss_on
        self.tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        for task in self.tasks:
            if task not in SAMPLERS:
                raise SyntheticError(f"task: must be one of {TASKS}, got {task!r}")
        # ``options`` maps an option to its value for every task that takes it (num_queries goes to needle and
        # recall), or a task's name to that task's own options (recall: {num_queries: 16}), which win.
        per_task = {t: options.pop(t) for t in list(options) if t in SAMPLERS}
        unknown = set(options) - set().union(*(task_options(t) for t in self.tasks))
        if unknown:
            raise SyntheticError(f"{sorted(unknown)[0]}: not an option of any of the tasks {self.tasks}")
        self.options = {t: {k: v for k, v in options.items() if k in task_options(t)} for t in self.tasks}
        for task, own in per_task.items():
            if not isinstance(own, dict):
                raise SyntheticError(f"{task}: expected a mapping of {task}'s options, got {own!r}")
            bad = set(own) - task_options(task)
            if bad:
                raise SyntheticError(f"{task}.{sorted(bad)[0]}: not an option of task {task!r}")
            if task in self.options:
                self.options[task].update(own)
        self.encoder = PartEncoder(tokenizer)
        self.seq_length, self.num_samples, self.seed = seq_length, num_samples, seed
        for task in self.tasks:  # fail now, not mid-training, if the length cannot hold a sample (sizes vary a little)
            for index in range(8):
                make_sample(task, self.encoder, seq_length + 1, seed=seed, index=index, **self.options[task])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} of {self.num_samples}")
        task = self.tasks[i % len(self.tasks)]
        s = make_sample(task, self.encoder, self.seq_length + 1, seed=self.seed, index=i, **self.options[task])
        ids = torch.tensor(s.input_ids, dtype=torch.long)
        return {
            "tokens": ids[:-1].clone(),
            "labels": ids[1:].clone(),
            "loss_mask": torch.tensor(s.loss_mask[1:], dtype=torch.float32)
            if self.loss_on == "answers"
            else torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.long),
        }


def _depths(rng: random.Random, needles: list[tuple[str, str, str, bool]], depth: float | None) -> list[float]:
    """A random depth per needle (drawn even when ``depth`` is given, so the other needles do not move);
    ``depth`` overrides the asked-for ones."""
    drawn = [rng.random() for _ in needles]
    if depth is None:
        return drawn
    depth = _fraction("depth", depth)
    return [depth if queried else d for d, (*_, queried) in zip(drawn, needles)]


def _fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise SyntheticError(f"{name}: must be between 0 and 1, got {value!r}")
    return float(value)


def _join_and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]
