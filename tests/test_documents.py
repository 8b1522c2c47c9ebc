"""Document mode (DESIGN.md §1 "Documents"): a packed row of documents gives each document what it gets alone.

The judge is the independent oracle (``tests/oracle.py``: keys listed per query from the contract, per document),
and, for the model, each document run alone through the same model. Float64 on random inputs; rows hold documents
shorter than a segment, documents spanning segment boundaries, GQA and every policy kind.
"""

import random

import oracle
import pytest
import torch
from attention_cases import dense_blocks
from tiny_models import DOCUMENTS_FORWARD, documents_config

from segtrain.attention import Documents, segment_attention
from segtrain.attention.documents import document_loss_mask
from segtrain.attention.flex import BLOCK, document_block_mask
from segtrain.models.llama import LlamaForCausalLM
from segtrain.policy import as_head_policies

FORWARD = DOCUMENTS_FORWARD
GRADIENT = dict(rtol=0, atol=1e-11)


def packed_case(seed: int) -> tuple[dict, list[list[int]]]:
    """An oracle case whose rows are packed documents (each row its own layout), at least two documents per row."""
    c = oracle.random_case(seed, max_segments=8)
    rng = random.Random(seed)
    rows = []
    for _ in range(c["B"]):
        while True:
            row = oracle.random_documents(rng, c["T"], c["S"])
            if row.count(0) >= 2:
                break
        rows.append(row)
    return c, rows


def spans(row: list[int]) -> list[tuple[int, int]]:
    starts = [t for t, p in enumerate(row) if p == 0]
    return list(zip(starts, starts[1:] + [len(row)]))


# ---- the oracle: document mode is each document alone ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_oracle_packed_equals_each_document_alone(seed):
    """The oracle's document masks are its one-stream masks of each document, placed where the document sits."""
    c, rows = packed_case(seed)
    q, k, v, _ = oracle.make_qkv(c, seed)
    packed = oracle.attention(q, k, v, c["S"], c["policies"], carry_grad=c["carry_grad"], positions=rows)
    for b, row in enumerate(rows):
        for a, e in spans(row):
            qkv = (t[b : b + 1, :, a:e] for t in (q, k, v))
            alone = oracle.attention(*qkv, c["S"], c["policies"], carry_grad=c["carry_grad"])
            torch.testing.assert_close(packed[b : b + 1, :, a:e], alone, **FORWARD)


# ---- every CPU backend against the oracle ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "math"])
@pytest.mark.parametrize("seed", range(16))
def test_backend_matches_oracle_in_document_mode(backend, seed):
    c, rows = packed_case(100 + seed)
    q, k, v, w = oracle.make_qkv(c, seed)
    want = oracle.attention(q, k, v, c["S"], c["policies"], carry_grad=c["carry_grad"], positions=rows)
    documents = Documents.from_position_ids(torch.tensor(rows))
    got = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend=backend, carry_grad=c["carry_grad"],
                            documents=documents)  # fmt: skip
    torch.testing.assert_close(got, want, **FORWARD)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, **GRADIENT)


def test_document_mode_differs_from_one_stream():
    """The check above can fail: one stream over the same packed row is a different computation."""
    c, rows = packed_case(3)
    q, k, v, _ = oracle.make_qkv(c, 3, requires_grad=False)
    kwargs = dict(segment_size=c["S"], policy=c["policies"], backend="math", carry_grad=c["carry_grad"])
    packed = segment_attention(q, k, v, documents=Documents.from_position_ids(torch.tensor(rows)), **kwargs)
    assert (packed - segment_attention(q, k, v, **kwargs)).abs().max() > 1e-3


@pytest.mark.parametrize("seed", range(8))
def test_flex_forward_matches_oracle_in_document_mode(seed):
    """FlexAttention on CPU runs eagerly (forward only, the exact mask_mod everywhere)."""
    c, rows = packed_case(200 + seed)
    q, k, v, _ = oracle.make_qkv(c, seed, requires_grad=False)
    want = oracle.attention(q, k, v, c["S"], c["policies"], carry_grad=c["carry_grad"], positions=rows)
    got = segment_attention(q, k, v, segment_size=c["S"], policy=c["policies"], backend="flex", carry_grad=c["carry_grad"],
                            documents=Documents.from_position_ids(torch.tensor(rows)))  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("carry_grad", [True, False])
@pytest.mark.parametrize("S", [128, 100, 256, 1])
def test_flex_document_blocks_cover_exactly_the_visible_keys(S, carry_grad):
    """Full blocks are all-visible, every block with a visible key is listed, and none is listed in vain: blocks
    between documents are skipped (the compiled kernels read these lists; eager FlexAttention ignores them)."""
    T, G = 1024, 2
    names = ["all", "none", "sink:5", "window:200+sink:130"]
    rng = random.Random(S)
    rows = [oracle.random_documents(rng, T, max(S, 150)) for _ in range(2)]
    ids = torch.tensor([[r[: t + 1].count(0) - 1 for t in range(T)] for r in rows])
    mask = document_block_mask(ids, torch.tensor(rows), S, as_head_policies(names, len(names)), G, carry_grad)
    visible = []
    for row in rows:
        heads = [oracle.document_masks(row, S, oracle.parse(n), carry_grad) for n in names]
        visible.append(torch.stack([torch.cat([live, past], -1) for live, past in heads]).repeat_interleave(G, 0))
    visible = torch.stack(visible)  # [B, Hq, T, 2T]
    blocks = visible.view(2, len(names) * G, T // BLOCK, BLOCK, 2 * T // BLOCK, BLOCK)
    any_visible, all_visible = blocks.any(5).any(3), blocks.all(5).all(3)
    full = dense_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, 2 * T // BLOCK)
    partial = dense_blocks(mask.kv_num_blocks, mask.kv_indices, 2 * T // BLOCK)
    assert not (full & partial).any()
    assert torch.equal(full & all_visible, full), "a block marked full has an invisible key"
    assert torch.equal((full | partial) & any_visible, any_visible), "a block with visible keys is not listed"
    assert torch.equal(full | partial, any_visible), "a block without a visible key is listed"
    assert (~any_visible).sum() > 0.5 * any_visible.numel(), "the case should skip most blocks"


# ---- the layout ------------------------------------------------------------------------------------------------------


def test_documents_from_position_ids():
    d = Documents.from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]))
    assert d.spans == (((0, 3), (3, 5), (5, 6)), ((0, 6),))
    assert d.ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert not d.is_one_stream() and Documents.from_position_ids(torch.arange(5)).is_one_stream()


@pytest.mark.parametrize(
    "positions, where",
    [([[0, 1, 2], [0, 1, 3]], "row 1, offset 2"), ([[0, 1, 1]], "row 0, offset 2"), ([[-1, 0, 1]], "row 0, offset 0")],
)
def test_bad_position_ids_name_row_and_offset(positions, where):
    with pytest.raises(ValueError, match=where):
        Documents.from_position_ids(torch.tensor(positions))


def test_a_row_inside_a_document_is_for_context_parallel_shards_only():
    documents = Documents.from_position_ids(torch.tensor([[5, 6, 0, 1]]))
    assert documents.continued and documents.spans == (((0, 2), (2, 4)),)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="position_ids: a row starts at position 5, inside a document"):
        segment_attention(q, q, q, segment_size=2, policy="all", backend="math", documents=documents)


def test_no_loss_crosses_a_document_boundary():
    mask = document_loss_mask(torch.tensor([[0, 1, 2, 0, 1, 0, 1]]))
    assert mask.tolist() == [[1, 1, 0, 1, 0, 1, 1]]


# ---- the model: each document of a packed batch gets its logits and gradients alone -------------------------------------


def _logits_and_grads(model, ids, positions, weights):
    model.zero_grad()
    logits = model(ids, position_ids=positions)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["math", "reference"])
def test_model_packed_equals_each_document_alone(backend):
    """Logits of every document, and the parameter gradients summed over documents, equal those of the documents run
    one by one (float64): so no key, position or segment boundary leaks between documents."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(documents_config(attention_backend=backend)).double()
    lengths = [3, 9, 1, 14, 5]  # shorter than a segment, several segments, a single token
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, 64, (1, sum(lengths)))
    weights = torch.randn(1, sum(lengths), 64, dtype=torch.float64)
    logits, grads = _logits_and_grads(model, ids, positions, weights)
    alone_grads = {n: torch.zeros_like(g) for n, g in grads.items()}
    a = 0
    for n in lengths:
        part, g = _logits_and_grads(model, ids[:, a : a + n], None, weights[:, a : a + n])
        torch.testing.assert_close(logits[:, a : a + n], part, **FORWARD)
        for name in alone_grads:
            alone_grads[name] += g[name]
        a += n
    for name, g in grads.items():
        torch.testing.assert_close(g, alone_grads[name], **GRADIENT, msg=name)
    one_stream = LlamaForCausalLM(documents_config(attention_backend=backend, documents=False)).double()
    one_stream.load_state_dict(model.state_dict())
    assert (one_stream(ids, position_ids=positions) - logits).abs().max() > 1e-4  # the check can fail


def test_model_rows_with_different_layouts():
    torch.manual_seed(1)
    model = LlamaForCausalLM(documents_config()).double()
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5, 6]])
    ids = torch.randint(0, 64, (2, 9))
    packed = model(ids, position_ids=positions)
    for b, (a, e) in [(0, (0, 6)), (0, (6, 9)), (1, (0, 2)), (1, (2, 9))]:
        torch.testing.assert_close(packed[b : b + 1, a:e], model(ids[b : b + 1, a:e]), **FORWARD)


# ---- data: documents from the indexed dataset's EOD tokens; no loss across a boundary ------------------------------------


def test_indexed_data_in_document_mode(tmp_path, corpus):
    """``model.documents`` turns on positions that restart after each EOD and masks every prediction across a document
    end (the EOD's own label, and a last token followed by another document), without the data options set."""
    from train_runs import write_config

    from segtrain.train.config import load_train_config
    from segtrain.train.data import build_train_dataset

    cfg = load_train_config(write_config(tmp_path, corpus, model__documents=True, data__seq_length=256))
    assert not cfg.data.reset_position_ids and not cfg.data.eod_mask_loss
    data = build_train_dataset(cfg, 8)
    starts = 0
    for i in range(8):
        s = data[i]
        pos, mask, tokens = s["position_ids"], s["loss_mask"], s["tokens"]
        documents = Documents.from_position_ids(pos)  # a valid layout: restarts at 0, counts up by one
        starts += len(documents.spans[0]) - 1
        is_eod = tokens == 2
        after_eod = torch.zeros_like(is_eod)
        after_eod[1:] = is_eod[:-1]
        assert torch.equal(pos == 0, after_eod | (torch.arange(256) == 0))  # a document starts after each EOD
        next_starts = torch.zeros_like(is_eod)
        next_starts[:-1] = pos[1:] == 0
        assert torch.equal(mask == 0, is_eod | next_starts)
    assert starts > 8  # documents (40 to 120 tokens) really are packed
    (tmp_path / "one").mkdir()
    one_stream = build_train_dataset(load_train_config(write_config(tmp_path / "one", corpus, data__seq_length=256)), 8)
    assert torch.equal(one_stream[0]["position_ids"], torch.arange(256)) and bool((one_stream[0]["loss_mask"] == 1).all())


def test_the_switch_is_validated_by_name():
    from segtrain.config import ConfigError

    with pytest.raises(ConfigError, match="model.documents: must be true or false, got 'yes'"):
        documents_config(documents="yes").validate()


def test_a_one_row_layout_for_a_batch_is_one_object():
    """A single-row layout applied to B rows is the same object on every layer's call, so the block mask a backend
    caches on it is built once per forward, not once per layer."""
    one = Documents.from_position_ids(torch.tensor([0, 1, 2, 0, 1, 0, 1, 2]))
    three = one.rows(3)
    assert three is one.rows(3) and three is not one.rows(2)
    assert three.spans == one.spans * 3 and torch.equal(three.ids, one.ids.expand(3, -1))
    three.cache["mask"] = object()
    assert "mask" in one.rows(3).cache
