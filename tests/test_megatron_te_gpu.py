"""The megatron model with Transformer Engine's layer spec (fused norm+linear, TE GEMMs): the local-spec model's
logits and gradients in BF16, and an FP8 (delayed scaling) forward and backward that stays close to BF16."""

import os

import pytest
import torch
import torch.distributed as dist
from attention_cases import history_dropped

from segtrain.config import ModelConfig

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def te_megatron():
    from segtrain.models.megatron import te_available

    if not te_available():
        pytest.skip("Transformer Engine is not installed")
    from segtrain.models.megatron import init_model_parallel
    from segtrain.parallel.groups import _free_port

    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    init_model_parallel(1, 1, seed=0)
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _config(**kw):
    base = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                segment_size=128, attention_backend="flex", history_policy={"fraction": 0.5}, initializer_range=0.02)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    positions = torch.arange(ids.shape[1], device="cuda")[None]
    logits = model(ids, positions, None)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_te_spec_model_matches_local_spec_model_bf16(te_megatron):
    """Logits, the loss and each position's loss (a wrong attention breaks that tolerance, shown) and gradients."""
    from segtrain.models.megatron import build_gpt_model
    from segtrain.models.megatron_adapter import spelled_like

    config = _config()
    torch.manual_seed(0)
    local = build_gpt_model(config, dtype=torch.bfloat16, use_te=False).cuda()
    te_model = build_gpt_model(config, dtype=torch.bfloat16, use_te=True).cuda()
    missing, unexpected = te_model.load_state_dict(spelled_like(local.state_dict(), te_model.state_dict()), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids, labels = (torch.randint(0, 512, (1, 512), device="cuda", generator=g) for _ in range(2))
    logits, loss, grads = _loss_and_grads(local, ids, labels)
    logits_te, loss_te, grads_te = _loss_and_grads(te_model, ids, labels)
    assert rel(logits_te, logits) < 2e-2 and abs(loss_te - loss) / loss < 1e-3  # bf16: 3e-5 relative on a CPU
    # At init 0.02 the mean loss is about ln(V) whatever attention does, each position's loss is not: on a CPU (this
    # shape, three seeds, bf16 against float64) rounding moved it by 4e-4 in relative norm, dropping every head's
    # history (the wrong attention below) by 1.4-1.6e-2.
    positions = torch.arange(ids.shape[1], device="cuda")[None]
    with torch.no_grad():
        per_token, per_token_te = (m(ids, positions, None, labels=labels) for m in (local, te_model))
        with history_dropped(local):
            wrong = local(ids, positions, None, labels=labels)
    print(f"per-position loss, relative norm: TE {rel(per_token_te, per_token):.2e}, wrong {rel(wrong, per_token):.2e}")
    assert rel(per_token_te, per_token) < 4e-3
    assert rel(wrong, per_token) > 8e-3, "the loss tolerance cannot tell a wrong attention"
    renamed = spelled_like(grads, grads_te)
    for name, grad in grads_te.items():
        assert rel(grad, renamed[name]) < 5e-2, name


def _train(model, ids, labels, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        model.set_is_first_microbatch()  # what the megatron recipe does before each step: FP8 weights recast
        _, loss, _ = _loss_and_grads(model, ids, labels)
        opt.step()
        losses.append(loss.item())
    return losses


def test_fp8_training_follows_bf16(te_megatron):
    """FP8 GEMMs (DelayedScaling, E4M3 forward / E5M2 backward) over 8 optimizer steps from the same init: the losses
    follow BF16's within 3%, and they fall (a stale FP8 weight cache would keep the first step's weights)."""
    from segtrain.models.megatron import build_gpt_model

    config = _config()
    torch.manual_seed(0)
    bf16 = build_gpt_model(config, dtype=torch.bfloat16, use_te=True).cuda()
    fp8 = build_gpt_model(config, dtype=torch.bfloat16, use_te=True, fp8="hybrid", fp8_recipe="delayed").cuda()
    fp8.load_state_dict(bf16.state_dict(), strict=False)
    g = torch.Generator(device="cuda").manual_seed(2)
    ids, labels = (torch.randint(0, 512, (1, 512), device="cuda", generator=g) for _ in range(2))
    ref, got = _train(bf16, ids, labels, 8), _train(fp8, ids, labels, 8)
    assert ref[-1] < 0.8 * ref[0] and got[-1] < 0.8 * got[0], (ref, got)
    assert all(abs(a - b) / b < 3e-2 for a, b in zip(got, ref)), (ref, got)


def test_fused_kernels_match_unfused(te_megatron):
    """megatron's fused SwiGLU, residual add, cross-entropy and TE's fused RoPE (the CUDA default) against the
    unfused model with the same weights: per-token losses (the chunked loss path, T > its chunk) and gradients
    within bf16 rounding, a batch of two rows sharing their positions; rows with different positions are refused."""
    from segtrain.models.megatron import build_gpt_model

    config = _config()
    torch.manual_seed(0)
    unfused = build_gpt_model(config, dtype=torch.bfloat16, use_te=True, fused=False).cuda()
    fused = build_gpt_model(config, dtype=torch.bfloat16, use_te=True, fused=True).cuda()
    assert fused.config.apply_rope_fusion and fused.config.bias_activation_fusion and not unfused.config.apply_rope_fusion
    fused.load_state_dict(unfused.state_dict())
    g = torch.Generator(device="cuda").manual_seed(3)
    T = 2 * fused.loss_chunk_size
    ids, labels = (torch.randint(0, 512, (2, T), device="cuda", generator=g) for _ in range(2))
    positions = torch.arange(T, device="cuda")[None].expand(2, T)
    out = {}
    for name, model in (("unfused", unfused), ("fused", fused)):
        model.zero_grad(set_to_none=True)
        loss = model(ids, positions, None, labels=labels)
        loss.float().mean().backward()
        out[name] = loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert out["fused"][0].shape == (2, T)
    assert rel(out["fused"][0], out["unfused"][0]) < 1e-2
    for name, grad in out["fused"][1].items():
        assert rel(grad, out["unfused"][1][name]) < 3e-2, name
    shifted = positions + torch.tensor([[0], [7]], device="cuda")
    with pytest.raises(ValueError, match="reset_position_ids"):
        fused(ids, shifted, None, labels=labels)
