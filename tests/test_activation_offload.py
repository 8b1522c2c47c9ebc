"""Host offload of what checkpointed layers keep: the same loss and gradients as without it (float64), the values
really come back from the host copies (corrupting them changes the gradients), one copy per tensor however often
it is saved, nothing offloaded outside training, and the config field; on a GPU, the same bf16 result with a lower
peak."""

import copy

import pytest
import torch
from tiny_models import checkpointed as _checkpointed
from tiny_models import loss_and_grads as _loss_and_grads
from tiny_models import make_model, tiny_config, tiny_train_config

from segtrain.config import ConfigError
from segtrain.speed.portable import offload_of

_cfg = tiny_train_config
POLICY = [["all", "sink:2+window:3"], ["none", "window:5"], ["all", "none"]]


def _batch(seed=0, B=2, T=48):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, (B, T), generator=g), torch.randint(0, 101, (B, T), generator=g)


def _offloaded(plain, num_layers=None, keep=0, keep_last=1, keep_matmuls=0):
    """Assembled with offload; layers that keep their matmuls' outputs are fetched two ahead, the others one."""
    model = _checkpointed(copy.deepcopy(plain), num_layers, keep, keep_matmuls, offload=True, offload_keep_last=keep_last,
                          offload_min_bytes=0)  # fmt: skip
    return model, offload_of(model)


@pytest.mark.parametrize(
    "num_layers, keep, keep_last", [(None, 0, 1), (None, 3, 1), (None, 3, 0), (2, 1, 1), (3, 2, 0), (1, 0, 0)]
)
def test_offload_changes_nothing_but_where_tensors_wait(num_layers, keep, keep_last):
    plain = make_model(tiny_config(num_layers=3, history_policy=POLICY), dtype=torch.float64).train()
    model, offload = _offloaded(plain, num_layers, keep, keep_last)
    ids, labels = _batch()
    loss, grads = _loss_and_grads(plain, ids, labels)
    loss_o, grads_o = _loss_and_grads(model, ids, labels)
    torch.testing.assert_close(loss_o, loss, rtol=0, atol=0)
    assert grads.keys() == grads_o.keys()  # parameter names unchanged
    for name, grad in grads.items():
        torch.testing.assert_close(grads_o[name], grad, rtol=0, atol=0, msg=name)
    offloaded = [i for i, g in offload.groups.items() if g.host]
    n = 3 if num_layers is None else num_layers
    assert offloaded == [i for i in range(3) if i < n and i < 3 - keep_last]  # checkpointed, not the last keep_last
    # all fetched device copies were handed to autograd and dropped: nothing stays on the device
    assert all(not g.device for g in offload.groups.values())


def test_the_backward_reads_the_host_copies():
    plain = make_model(tiny_config(num_layers=3, history_policy=POLICY), dtype=torch.float64).train()
    model, offload = _offloaded(plain, keep=3)
    ids, labels = _batch(1)
    _, grads = _loss_and_grads(model, ids, labels)
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels)
    for host in offload.groups[0].host:
        if host.is_floating_point():
            host.mul_(1.01)  # what layer 0 kept, as if the copy had gone wrong
    loss.backward()
    first = {n: p.grad for n, p in model.named_parameters() if "layers.0." in n or "embed" in n}
    assert any(not torch.allclose(g, grads[n.replace("._checkpoint_wrapped_module", "")]) for n, g in first.items())
    later = {n: p.grad for n, p in model.named_parameters() if "layers.2." in n}
    for n, g in later.items():  # layer 2 is not offloaded and comes first in backward: unchanged
        torch.testing.assert_close(g, grads[n.replace("._checkpoint_wrapped_module", "")], rtol=0, atol=0)


@pytest.mark.parametrize("ahead, keep_matmuls", [(1, 0), (2, 2)])
def test_each_layer_is_fetched_before_its_backward_asks(ahead, keep_matmuls):
    plain = make_model(tiny_config(num_layers=4, history_policy=POLICY + [["none", "all"]]), dtype=torch.float64).train()
    _, grads = _loss_and_grads(plain, *_batch(5))
    model, offload = _offloaded(plain, keep=3, keep_matmuls=keep_matmuls)
    ids, labels = _batch(5)
    fetched_when_asked = {}
    unpack = offload.unpack

    events = []

    def watch(saved):
        if not isinstance(saved, torch.Tensor):
            fetched_when_asked.setdefault(saved.group, saved.group.device is not None)
            events.append(("unpack", saved.group))
        return unpack(saved)

    offload.unpack = watch
    fetches = []
    fetch = offload._fetch
    offload._fetch = lambda group: (
        (fetches.append(group), events.append(("fetch", group))) if group.device is None else None,
        fetch(group),
    )
    _, grads_o = _loss_and_grads(model, ids, labels)
    groups = offload.groups
    assert len(fetched_when_asked) == 3 and all(fetched_when_asked.values())  # layers 2, 1, 0: by the hooks
    assert fetches == [groups[2], groups[1], groups[0]]
    # two ahead: layer 0 is on its way before layer 2's backward asks for anything; one ahead: during layer 1's
    assert (events.index(("fetch", groups[0])) < events.index(("unpack", groups[2]))) == (ahead == 2)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_o[name], grad, rtol=1e-12, atol=0, msg=name)


def test_a_tensor_saved_twice_is_copied_once():
    # keeping attention, the slot's output is saved by the slot and is the input of the checkpoint after it
    plain = make_model(tiny_config(num_layers=2, history_policy=[["all", "all"], ["all", "none"]]), dtype=torch.float64)
    model, offload = _offloaded(plain.train(), keep=2)
    ids, labels = _batch(2, B=1, T=64)
    loss = model(ids, labels=labels)
    group = offload.groups[0]
    data_ptrs = [h.untyped_storage().data_ptr() for h in group.host]
    assert len(set(data_ptrs)) == len(group.host)
    assert sum(group.uses) > len(group.host)  # some place serves two saves
    loss.backward()
    assert all(not g.device for g in offload.groups.values())  # what was fetched and not asked for is dropped too


def test_retain_graph_backward_twice_fetches_again():
    plain = make_model(tiny_config(num_layers=3, history_policy=POLICY), dtype=torch.float64).train()
    model, _ = _offloaded(plain, keep=2)
    ids, labels = _batch(3)
    loss = model(ids, labels=labels)
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n], rtol=1e-12, atol=0, msg=n)


def test_nothing_is_offloaded_without_grad():
    plain = make_model(tiny_config(num_layers=3, history_policy=POLICY), dtype=torch.float64).train()
    model, offload = _offloaded(plain, keep=3)
    ids, _ = _batch(4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=0)
    assert offload.groups == {}


def test_offload_needs_checkpointing_and_the_portable_model():
    with pytest.raises(ConfigError, match="portable.activation.offload: offloads what checkpointed layers keep"):
        _cfg(portable={"activation": {"offload": True}})
    with pytest.raises(ConfigError, match="portable: options of the portable model, but this config trains the megatron"):
        _cfg(model_impl="megatron", portable={"activation": {"checkpointing": True, "offload": True}})
    with pytest.raises(ConfigError, match=r"megatron.activation.offload: unknown key"):
        _cfg(model_impl="megatron", megatron={"activation": {"checkpointing": True, "offload": True}})


@pytest.mark.gpu
def test_offload_on_gpu_gives_the_same_bf16_step_at_a_lower_peak():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = tiny_config(num_layers=4, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2,
                         segment_size=256, history_policy=[["all", "none"]] * 4)  # fmt: skip
    plain = make_model(config, dtype=torch.bfloat16).cuda().train()
    kept = _checkpointed(copy.deepcopy(plain), keep_attention=4)
    offloaded, _ = _offloaded(plain, keep=4)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 101, (1, 4096), generator=g).cuda()
    labels = torch.randint(0, 101, (1, 4096), generator=g).cuda()

    def step(model):
        _loss_and_grads(model, ids, labels)  # warm up (kernels, pinned host blocks)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, grads = _loss_and_grads(model, ids, labels)
        torch.cuda.synchronize()
        return loss, grads, torch.cuda.max_memory_allocated() - base

    loss_k, grads_k, peak_k = step(kept)
    loss_o, grads_o, peak_o = step(offloaded)
    print(f"peak above weights and grads: kept {peak_k / 2**20:.1f} MiB, offloaded {peak_o / 2**20:.1f} MiB")
    torch.testing.assert_close(loss_o, loss_k, rtol=0, atol=0)
    # Looser than the CPU twin (exact): CUDA's backward kernels are not guaranteed to sum in the same order in two runs
    # (torch.use_deterministic_algorithms is off), and a bf16 gradient holds 8 significant bits, so one reordered sum can
    # move an element by an ulp, 2^-8 = 3.9e-3 relative; 1e-2 is about two ulps.
    worst = max(((grads_o[n].float() - g.float()).abs().max() / g.float().abs().max()).item() for n, g in grads_k.items())
    print(f"largest gradient difference, relative to the tensor's largest element: {worst:.2e}")
    for name, grad in grads_k.items():
        torch.testing.assert_close(grads_o[name], grad, rtol=1e-2, atol=1e-3, msg=name)
    assert peak_o < peak_k - 8 * 2**20  # at least two layers' q, k, v, out left the device
