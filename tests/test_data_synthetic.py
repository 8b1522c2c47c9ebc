"""Synthetic long-range tasks: exact lengths, answers really in the haystack where claimed, determinism."""

import re

import pytest
import torch

from segtrain.data.synthetic import TASKS, SyntheticDataset, SyntheticError, eval_set, make_sample


@pytest.fixture(scope="module")
def tok(make_tokenizer):
    return make_tokenizer(800, 200_000)


OPTIONS = {"passkey": {}, "needle": {"num_keys": 5, "num_queries": 2}, "recall": {"num_pairs": 8, "num_queries": 3}}


def check_sample(tok, s, seq_length):
    assert len(s.input_ids) == len(s.loss_mask) == seq_length
    assert s.input_ids[0] == tok.bos_id
    # The answers sit where claimed, are exactly what the loss mask covers, and end the sequence.
    assert len(s.answers) == len(s.answer_spans) >= 1
    assert s.answer_spans[-1][1] == seq_length
    masked = [i for i, m in enumerate(s.loss_mask) if m]
    assert masked == [i for a, b in s.answer_spans for i in range(a, b)]
    for (a, b), answer in zip(s.answer_spans, s.answers):
        assert s.input_ids[a:b] == tok.encode(" " + answer)
    # Every needle's span holds its key and value; the queried ones carry the answers.
    for n in s.needles:
        assert s.input_ids[n.start : n.end] == tok.encode(" " + n.text)
        assert n.value in n.text and n.key in n.text
    assert [n.start for n in s.needles] == sorted(n.start for n in s.needles)
    assert all(a.end <= b.start for a, b in zip(s.needles, s.needles[1:]))  # needles never overlap
    assert s.needles[-1].end <= s.answer_spans[0][0]
    # The text and the ids agree: encoding the prompt text gives the prompt ids.
    assert tok.encode(s.prompt, bos=True) == s.prompt_ids
    assert tok.decode(s.prompt_ids) == s.prompt


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("seq_length", [700, 1001, 4096])
def test_samples_are_exact(tok, task, seq_length):
    for index in range(3):
        s = make_sample(task, tok, seq_length, seed=7, index=index, **OPTIONS[task])
        assert s.task == task
        check_sample(tok, s, seq_length)


def test_answers_match_the_queried_needles(tok):
    s = make_sample("passkey", tok, 2000, seed=1, index=4)
    (needle,) = s.needles
    assert re.fullmatch(r"\d{5}", s.answer) and needle.value == s.answer and needle.queried
    assert s.prompt.endswith("What is the pass key? The pass key is")

    s = make_sample("needle", tok, 3000, seed=1, index=4, num_keys=6, num_queries=2)
    queried = [n for n in s.needles if n.queried]
    assert len(s.needles) == 6 and len(queried) == 2
    assert len({n.key for n in s.needles}) == 6 and len({n.value for n in s.needles}) == 6  # distractors differ
    values_by_key = {n.key: n.value for n in s.needles}
    asked = re.search(r"numbers for (\S+) and (\S+) mentioned in the provided text\? ", s.prompt).groups()
    assert set(asked) == {n.key for n in queried}
    assert s.answer == ", ".join(values_by_key[k] for k in asked)

    s = make_sample("recall", tok, 3000, seed=1, index=4, num_pairs=10, num_queries=4)
    values_by_key = {n.key: n.value for n in s.needles}
    assert len(s.answers) == 4 and sum(n.queried for n in s.needles) == 4
    for (a, _), answer in zip(s.answer_spans, s.answers):
        before = tok.decode(s.input_ids[:a])
        key = before.rsplit(" ", 1)[-1].rstrip(":")  # "... <key>:" right before each answer
        assert values_by_key[key] == answer


def test_passkey_depth(tok):
    head = make_sample("passkey", tok, 1500, depth=0.0)
    tail = make_sample("passkey", tok, 1500, depth=1.0)
    middle = make_sample("passkey", tok, 1500, depth=0.5)
    start_of_filler = head.needles[0].start
    end_of_filler = tail.needles[0].start
    assert tok.decode(head.input_ids[1:start_of_filler]).endswith("important information there.")
    assert tok.decode(tail.input_ids[tail.needles[0].end : tail.answer_spans[0][0]]).strip().startswith("What is the pass key?")
    assert abs(middle.needles[0].start - (start_of_filler + end_of_filler) / 2) <= 1


def test_passkey_max_depth_keeps_the_key_early(tok):
    """``max_depth`` bounds the random depth (the demo keeps its key 3-4 segments before the question); 1.0 is the default."""
    bound = make_sample("passkey", tok, 600, depth=0.3).needles[0].start
    starts = [make_sample("passkey", tok, 600, index=i, max_depth=0.3).needles[0].start for i in range(40)]
    assert max(starts) <= bound + 1 and len(set(starts)) > 10
    assert make_sample("passkey", tok, 600, index=3, max_depth=1.0) == make_sample("passkey", tok, 600, index=3)


def test_determinism(tok):
    for task in TASKS:
        a = make_sample(task, tok, 900, seed=3, index=5, **OPTIONS[task])
        assert a == make_sample(task, tok, 900, seed=3, index=5, **OPTIONS[task])
        assert a.input_ids != make_sample(task, tok, 900, seed=3, index=6, **OPTIONS[task]).input_ids
        assert a.input_ids != make_sample(task, tok, 900, seed=4, index=5, **OPTIONS[task]).input_ids
    assert [s.input_ids for s in eval_set("needle", tok, 800, 4, seed=2)] == [
        make_sample("needle", tok, 800, seed=2, index=i).input_ids for i in range(4)
    ]


def test_long_context(tok):
    s = make_sample("needle", tok, 65_536, seed=0, index=0, num_keys=16, num_queries=4)
    check_sample(tok, s, 65_536)
    assert s.needles[-1].start - s.needles[0].start > 20_000  # spread through the haystack


def test_training_dataset(tok):
    ds = SyntheticDataset(["passkey", "recall"], tok, 1024, num_samples=6, seed=9, num_pairs=6, num_queries=2)
    assert len(ds) == 6
    for i in range(len(ds)):
        item = ds[i]
        s = make_sample(
            ["passkey", "recall"][i % 2],
            tok,
            1025,
            seed=9,
            index=i,
            **({} if i % 2 == 0 else OPTIONS["recall"] | {"num_pairs": 6, "num_queries": 2}),
        )
        assert item["tokens"].tolist() == s.input_ids[:-1] and item["labels"].tolist() == s.input_ids[1:]
        assert torch.equal(item["position_ids"], torch.arange(1024))
        answer_tokens = [t for a, b in s.answer_spans for t in s.input_ids[a:b]]
        assert item["labels"][item["loss_mask"] == 1].tolist() == answer_tokens  # loss only on predicting answers
    with pytest.raises(IndexError):
        ds[6]


def test_tokenizer_may_be_a_path(tok, tmp_path):
    """Configs name tokenizers by path (data.tokenizer)."""
    by_path = SyntheticDataset("needle", tok.save(tmp_path), 900, num_samples=2, seed=4)
    by_object = SyntheticDataset("needle", tok, 900, num_samples=2, seed=4)
    assert all(torch.equal(by_path[i]["tokens"], by_object[i]["tokens"]) for i in range(2))
    assert make_sample("passkey", tmp_path, 600) == make_sample("passkey", tok, 600)


def test_errors_name_the_argument(tok):
    with pytest.raises(SyntheticError, match="seq_length: 50 tokens are too few"):
        make_sample("needle", tok, 50)
    with pytest.raises(SyntheticError, match="task"):
        make_sample("sorting", tok, 500)
    with pytest.raises(SyntheticError, match="num_pairs: not an option of task 'passkey'"):
        make_sample("passkey", tok, 500, num_pairs=3)
    with pytest.raises(SyntheticError, match="num_queries"):
        make_sample("needle", tok, 500, num_keys=2, num_queries=3)
    with pytest.raises(SyntheticError, match="depth"):
        make_sample("passkey", tok, 500, depth=1.5)
    with pytest.raises(SyntheticError, match="filler"):
        make_sample("needle", tok, 500, filler="lorem")
    with pytest.raises(SyntheticError, match="seq_length"):
        SyntheticDataset("recall", tok, 64, num_samples=2)
    with pytest.raises(SyntheticError, match="colour: not an option"):
        SyntheticDataset(["passkey", "needle"], tok, 512, num_samples=2, colour="red")


def test_training_options_per_task_and_loss_on_every_token(tok):
    """Shared options go to every task that takes them, a task's own options win; ``loss_on="all"`` masks nothing."""
    ds = SyntheticDataset(["needle", "recall"], tok, 600, 4, num_queries=2, recall={"num_pairs": 8, "num_queries": 8})
    assert ds.options == {"needle": {"num_queries": 2}, "recall": {"num_pairs": 8, "num_queries": 8}}
    answers = make_sample("recall", tok, 601, seed=0, index=1, num_pairs=8, num_queries=8).answers
    assert len(answers) == 8 and int(ds[1]["loss_mask"].sum()) > 0
    every = SyntheticDataset(["passkey"], tok, 300, 2, loss_on="all")
    assert torch.equal(every[0]["loss_mask"], torch.ones(300)) and torch.equal(every[0]["tokens"], ds_tokens(tok))
    with pytest.raises(SyntheticError, match=r"recall\.num_keys: not an option"):
        SyntheticDataset(["recall"], tok, 600, 2, recall={"num_keys": 3})
    with pytest.raises(SyntheticError, match="loss_on: must be"):
        SyntheticDataset(["passkey"], tok, 300, 2, loss_on="some")


def ds_tokens(tok):
    return SyntheticDataset(["passkey"], tok, 300, 2)[0]["tokens"]
