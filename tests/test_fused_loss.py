"""``weighted_cross_entropy`` against plain autograd through the model's own norm, head and cross-entropy formulas."""

import functools

import pytest
import torch
import torch.nn.functional as F

from segtrain.loss import IGNORE_INDEX
from segtrain.models.fused_loss import chunk_loss_and_grads, weighted_cross_entropy

EPS = 1e-5


def make_inputs(batch, seq_len, dim, vocab, dtype=torch.float64, seed=0):
    """Random leaves (never zeros), about a quarter of the labels ignored, non-uniform weights."""
    torch.manual_seed(seed)
    hidden = torch.randn(batch, seq_len, dim, dtype=torch.float64) * 3
    norm_weight = 1 + 0.5 * torch.randn(dim, dtype=torch.float64)
    head_weight = torch.randn(vocab, dim, dtype=torch.float64) * 0.3
    labels = torch.randint(0, vocab, (batch, seq_len))
    labels[torch.rand(batch, seq_len) < 0.25] = IGNORE_INDEX
    weights = torch.rand(batch, seq_len, dtype=torch.float64) + 0.1
    weights = weights / weights.sum()
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, norm_weight, head_weight)]
    return leaves, labels, weights.float() if dtype != torch.float64 else weights


def reference(hidden, norm_weight, head_weight, labels, weights):
    """The whole sequence at once, as ``RMSNorm.forward``, ``LlamaForCausalLM.logits`` and ``_chunk_ce`` do."""
    dtype = hidden.dtype
    acc = torch.promote_types(dtype, torch.float32)
    x = hidden.to(acc)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    y = norm_weight * x.to(dtype)
    logits = (y @ head_weight.T).to(acc)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    return (weights.to(acc) * ce.view(labels.shape)).sum()


def loss_and_grads(fn, leaves, labels, weights, scale=1.0, **kwargs):
    for leaf in leaves:
        leaf.grad = None
    loss = fn(*leaves, labels, weights, **kwargs)
    (scale * loss).backward()
    return loss.detach(), [leaf.grad.clone() for leaf in leaves]


def fused(*args, chunk_size, chunk_fn=None):
    return weighted_cross_entropy(*args, eps=EPS, chunk_size=chunk_size, chunk_fn=chunk_fn)


@pytest.mark.parametrize(
    "batch, seq_len, dim, vocab, chunk_size",
    [(1, 37, 16, 50, 8), (2, 29, 32, 300, 7), (2, 20, 64, 129, 64), (1, 12, 24, 77, 1)],
)
def test_matches_autograd_float64(batch, seq_len, dim, vocab, chunk_size):
    leaves, labels, weights = make_inputs(batch, seq_len, dim, vocab)
    ref_loss, ref_grads = loss_and_grads(reference, leaves, labels, weights)
    loss, grads = loss_and_grads(fused, leaves, labels, weights, chunk_size=chunk_size)
    assert loss.dtype == torch.float64 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for name, got, want in zip(("hidden", "norm_weight", "head_weight"), grads, ref_grads):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, msg=lambda m, name=name: f"{name}: {m}")


def test_ignored_positions_contribute_nothing():
    leaves, labels, weights = make_inputs(2, 15, 16, 40)
    labels[1] = IGNORE_INDEX
    loss, grads = loss_and_grads(fused, leaves, labels, weights, chunk_size=4)
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))
    first = [leaves[0][:1].detach().requires_grad_(), *leaves[1:]]
    first_loss, first_grads = loss_and_grads(fused, first, labels[:1], weights[:1], chunk_size=4)
    torch.testing.assert_close(loss, first_loss, rtol=1e-12, atol=0)
    for got, want in zip(grads[1:], first_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_scaled_by_grad_output():
    leaves, labels, weights = make_inputs(2, 19, 16, 60)
    _, once = loss_and_grads(fused, leaves, labels, weights, chunk_size=5)
    _, thrice = loss_and_grads(fused, leaves, labels, weights, scale=3.0, chunk_size=5)
    for a, b in zip(once, thrice):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, 3 * a, rtol=1e-12, atol=0)


def test_tied_head_sums_with_embedding_grad():
    """The head grad is returned to the shared weight, where autograd adds the embedding's own grad."""
    (hidden, norm_weight, weight), labels, weights = make_inputs(1, 11, 16, 30)
    ids = torch.randint(0, 30, (1, 11))
    grads = []
    for fn in (reference, functools.partial(fused, chunk_size=4)):
        weight.grad = None
        fn(hidden + F.embedding(ids, weight), norm_weight, weight, labels, weights).backward()
        grads.append(weight.grad.clone())
    head_only = torch.autograd.grad(reference(hidden.detach(), norm_weight, weight, labels, weights), weight)[0]
    assert (grads[0] - head_only).abs().max() > 1e-3  # the embedding's share is really there
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-13)


def test_bfloat16_close_to_float64():
    leaves64, labels, weights64 = make_inputs(2, 33, 64, 257)
    ref_loss, ref_grads = loss_and_grads(reference, leaves64, labels, weights64)
    leaves, _, weights = make_inputs(2, 33, 64, 257, dtype=torch.bfloat16)
    loss, grads = loss_and_grads(fused, leaves, labels, weights, chunk_size=16)
    assert loss.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-2, atol=0)
    for name, got, want in zip(("hidden", "norm_weight", "head_weight"), grads, ref_grads):
        err = (got.double() - want).norm() / want.norm()
        assert err < 3e-2, f"{name}: relative error {err:.3g}"


def test_compiled_chunk_fn_matches_eager():
    leaves, labels, weights = make_inputs(2, 21, 32, 100)
    compiled = torch.compile(chunk_loss_and_grads, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = loss_and_grads(fused, leaves, labels, weights, chunk_size=8)
    loss, grads = loss_and_grads(fused, leaves, labels, weights, chunk_size=8, chunk_fn=compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=0)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_backward_runs_once():
    leaves, labels, weights = make_inputs(1, 9, 16, 20)
    loss = fused(*leaves, labels, weights, chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


# --- the model and the recipes with the fused loss ---------------------------------------------------------------


def _model_loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels, **kwargs)
    loss.backward()
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied, wrap", [(False, None), (True, None), (False, "keep_offload"), (True, "compile")])
def test_the_model_with_loss_weights_equals_its_mean_loss(tied, wrap):
    import copy

    from tiny_models import make_model, tiny_config

    from segtrain.loss import loss_weights
    from segtrain.speed.portable import ActivationOptions, parallelize_portable

    torch._dynamo.reset()
    plain = make_model(tiny_config(num_layers=2, tie_word_embeddings=tied), dtype=torch.float64).train()
    plain.loss_chunk_size = 20  # three chunks of 48, the last short
    fused = copy.deepcopy(plain)
    if wrap == "keep_offload":
        activation = ActivationOptions(checkpointing=True, keep_attention=2, offload=True)
        parallelize_portable(fused, activation=activation, offload_min_bytes=0)
    elif wrap == "compile":
        parallelize_portable(fused, compile=True, backend="aot_eager")
    g = torch.Generator().manual_seed(11)
    ids, labels = torch.randint(0, 101, (2, 48), generator=g), torch.randint(0, 101, (2, 48), generator=g)
    labels[0, :5] = IGNORE_INDEX
    mask = torch.rand(2, 48, generator=g, dtype=torch.float64)
    loss, grads = _model_loss_and_grads(plain, ids, labels, loss_mask=mask)
    loss_f, grads_f = _model_loss_and_grads(fused, ids, labels, loss_weights=loss_weights(labels, mask))
    assert loss.item() > 1.0
    torch.testing.assert_close(loss_f, loss, rtol=1e-12, atol=0)
    assert grads.keys() == grads_f.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-10, atol=1e-14, msg=name)


def test_the_portable_recipe_fuses_the_same_loss():
    from types import SimpleNamespace

    from tiny_models import portable_train_config as _cfg

    from segtrain.train.recipes.portable import PortableRecipe, fuses_loss

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fuses_loss(_cfg(), cuda) and not fuses_loss(_cfg(), cpu) and not fuses_loss(_cfg(zero_stage=3), cuda)
    assert fuses_loss(_cfg(fused_loss=True), cpu) and not fuses_loss(_cfg(fused_loss=False), cuda)

    results = []
    for fused in (False, True):
        cfg = _cfg(fused_loss=fused, compile=False)
        recipe = PortableRecipe()
        groups = SimpleNamespace(layout=SimpleNamespace(cp=1))
        torch.manual_seed(0)
        model = recipe.build(cfg, groups, cpu, torch.float64, None).train()
        assert recipe.fused_loss is fused
        g = torch.Generator().manual_seed(12)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=g)
        labels = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=g)
        labels[1, 10:] = IGNORE_INDEX
        loss = recipe.micro_loss(model, dict(tokens=tokens, labels=labels))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss, grads), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss, rtol=1e-12, atol=0)
    for grad, grad_f in zip(grads, grads_f):
        torch.testing.assert_close(grad_f, grad, rtol=1e-10, atol=1e-14)


def test_fused_loss_values_and_refusals_name_the_field():
    from tiny_models import portable_train_config as _cfg

    from segtrain.config import ConfigError

    with pytest.raises(ConfigError, match="portable.fused_loss: must be auto, true or false, got 'on'"):
        _cfg(fused_loss="on")
    with pytest.raises(ConfigError, match="portable.fused_loss: true reads the LM head outside its module"):
        _cfg(fused_loss=True, zero_stage=3)
    with pytest.raises(ConfigError, match="portable: options of the portable model, but this config trains the megatron"):
        _cfg(fused_loss=True, model_impl="megatron")


@pytest.mark.gpu
def test_inductor_fused_loss_matches_the_chunked_loss_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import copy

    from tiny_models import make_model, tiny_config

    from segtrain.loss import loss_weights
    from segtrain.speed.portable import parallelize_portable

    torch._dynamo.reset()
    config = tiny_config(num_layers=2, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2,
                         vocab_size=32000, segment_size=256)  # fmt: skip
    plain = make_model(config, dtype=torch.bfloat16).cuda().train()
    plain.loss_chunk_size = 512
    fused = parallelize_portable(copy.deepcopy(plain), compile=True)  # copy first: a compiled region calls its module
    parallelize_portable(plain, compile=True)
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 32000, (1, 2048), generator=g).cuda()
    labels = torch.randint(0, 32000, (1, 2048), generator=g).cuda()
    loss, grads = _model_loss_and_grads(plain, ids, labels)
    loss_f, grads_f = _model_loss_and_grads(fused, ids, labels, loss_weights=loss_weights(labels))
    print(f"loss: chunked {loss.item():.6f}, fused {loss_f.item():.6f}")
    torch.testing.assert_close(loss_f, loss, rtol=2e-3, atol=0)
    for name, grad in grads.items():
        err = (grads_f[name].float() - grad.float()).norm() / grad.float().norm()
        assert err < 2e-2, f"{name}: relative error {err:.2e}"
