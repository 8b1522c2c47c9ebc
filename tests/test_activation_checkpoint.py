"""Activation checkpointing of the first N decoder layers, whole or around the attention slot: the same loss and
gradients as none (float64), the attention forward run once where it is kept, less saved than none, and the config
knobs that ask for it, in both recipes."""

import copy

import pytest
import torch
from tiny_models import checkpointed as _checkpointed
from tiny_models import loss_and_grads as _loss_and_grads
from tiny_models import make_model, tiny_config, tiny_train_config

from segtrain.config import ConfigError
from segtrain.speed.portable import AssembledLayer


def _how(model) -> list:
    """Each layer's checkpointing: None, "layer" (whole) or "around_attention"."""
    return [getattr(layer, "checkpoint", None) for layer in model.model.layers]


@pytest.mark.parametrize("num_layers", [None, 1, 2, 5])
def test_checkpointing_the_first_layers_changes_nothing_but_memory(num_layers):
    config = tiny_config(num_layers=3, history_policy=[["all", "sink:2+window:3"], ["none", "window:5"], ["all", "none"]])
    plain = make_model(config, dtype=torch.float64).train()
    wrapped = _checkpointed(copy.deepcopy(plain), num_layers)
    assert _how(wrapped) == ["layer" if i < (3 if num_layers is None else num_layers) else None for i in range(3)]

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 101, (2, 48), generator=g), torch.randint(0, 101, (2, 48), generator=g)
    loss, grads = _loss_and_grads(plain, ids, labels)
    loss_w, grads_w = _loss_and_grads(wrapped, ids, labels)
    torch.testing.assert_close(loss_w, loss, rtol=0, atol=0)
    assert grads.keys() == grads_w.keys()  # parameter names stay loadable
    for name, grad in grads.items():
        torch.testing.assert_close(grads_w[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def _slot_calls(model) -> list[int]:
    """Count every layer's attention slot calls (forward and recompute), per layer."""
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        inner = layer._checkpoint_wrapped_module if isinstance(layer, AssembledLayer) else layer
        slot = inner.self_attn.core_attention
        slot.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _saved_bytes(model, ids, labels) -> int:
    """Bytes autograd holds for backward after one forward (every saved tensor counted once per save)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=labels)
    loss.backward()
    return total


@pytest.mark.parametrize("num_layers, keep", [(None, 3), (None, 1), (2, 2), (3, 2)])
def test_keeping_attention_changes_nothing_but_memory_and_runs_attention_once(num_layers, keep):
    config = tiny_config(num_layers=3, history_policy=[["all", "sink:2+window:3"], ["none", "window:5"], ["all", "none"]])
    plain = make_model(config, dtype=torch.float64).train()
    wrapped = _checkpointed(copy.deepcopy(plain), num_layers, keep_attention=keep)
    n = 3 if num_layers is None else num_layers
    assert _how(wrapped) == ["around_attention" if i < keep else "layer" if i < n else None for i in range(3)]

    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 101, (2, 48), generator=g), torch.randint(0, 101, (2, 48), generator=g)
    loss, grads = _loss_and_grads(plain, ids, labels)
    calls = _slot_calls(wrapped)
    loss_w, grads_w = _loss_and_grads(wrapped, ids, labels)
    # the kept layers ran their slot once; whole-layer checkpointing runs it again in backward
    assert calls == [1 if i < keep else 2 if i < n else 1 for i in range(3)]
    torch.testing.assert_close(loss_w, loss, rtol=0, atol=0)
    assert grads.keys() == grads_w.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_w[name], grad, rtol=1e-12, atol=1e-14, msg=name)
    with torch.no_grad():  # evaluation: no checkpoint at all, the same logits
        torch.testing.assert_close(wrapped(ids), plain(ids), rtol=0, atol=0)


def test_keeping_attention_saves_more_than_whole_layers_and_less_than_none():
    config = tiny_config(num_layers=2, history_policy=[["all", "all"], ["all", "none"]])
    plain = make_model(config, dtype=torch.float64).train()
    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(0, 101, (1, 64), generator=g), torch.randint(0, 101, (1, 64), generator=g)
    none = _saved_bytes(plain, ids, labels)
    around = _saved_bytes(_checkpointed(copy.deepcopy(plain), keep_attention=2), ids, labels)
    whole = _saved_bytes(_checkpointed(copy.deepcopy(plain)), ids, labels)
    assert whole < around < none
    # twice is refused, not a second checkpoint around the first
    once = _checkpointed(copy.deepcopy(plain), keep_attention=2)
    with pytest.raises(ValueError, match="assembled already"):
        _checkpointed(once, keep_attention=2)


_cfg = tiny_train_config


A = "portable.activation"


@pytest.mark.parametrize(
    "activation, message",
    [
        (dict(layers=1), f"{A}.layers: set {A}.checkpointing: true"),
        (dict(checkpointing=True, layers=0), f"{A}.layers: must be a positive integer"),
        (dict(checkpointing=True, layers=3), f"{A}.layers: 3 is more than the 2 decoder layers"),
        (dict(keep_attention=1), f"{A}.keep_attention: set {A}.checkpointing: true"),
        (dict(checkpointing=True, keep_attention=-1), f"{A}.keep_attention: must be a positive integer"),
        (dict(checkpointing=True, keep_attention=3), "more than the 2 checkpointed"),
        (dict(checkpointing=True, layers=1, keep_attention=2), rf"more than the 1 checkpointed layers \({A}.layers\)"),
        (dict(checkpointing=True, keep_matmuls=1), f"{A}.keep_matmuls: 1 is more than the 0"),
        (dict(checkpointing=True, keep_attention=1, keep_matmuls=-2), "must be a positive integer"),
        (dict(offload=True), f"{A}.offload: offloads what checkpointed layers keep"),
    ],
)
def test_bad_checkpointing_layers_name_the_field(activation, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(portable={"activation": activation})


def test_megatron_recompute_follows_the_knob():
    from segtrain.train.recipes.megatron import MegatronActivation, recompute_overrides

    assert recompute_overrides(MegatronActivation(False)) == {}
    full = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    assert recompute_overrides(MegatronActivation(True)) == full
    assert recompute_overrides(MegatronActivation(True, 3)) == {**full, "recompute_method": "block", "recompute_num_layers": 3}
    with pytest.raises(ConfigError, match="megatron.activation.layers: 3 is more than the 2 decoder layers"):
        _cfg(model_impl="megatron", megatron={"activation": {"checkpointing": True, "layers": 3}})


def test_megatron_refuses_the_portable_section_and_old_keys_say_where_they_moved(tmp_path):
    with pytest.raises(ConfigError, match="portable: options of the portable model, but this config trains the megatron"):
        _cfg(model_impl="megatron", portable={"activation": {"checkpointing": True, "keep_attention": 1}})
    with pytest.raises(ConfigError, match="megatron: options of the megatron model, but this config trains the portable"):
        _cfg(megatron={"fusions": False})
    from segtrain.train.config import load_train_config

    path = tmp_path / "old.yaml"
    path.write_text("model: tiny\ndata: {synthetic: passkey}\nactivation_checkpointing_keep_attention: 2\n")
    with pytest.raises(
        ConfigError, match=r"^activation_checkpointing_keep_attention: moved to portable.activation.keep_attention \(docs"
    ):
        load_train_config(path, check_paths=False)
    path.write_text("model: tiny\ndata: {synthetic: passkey}\n")
    with pytest.raises(ConfigError, match=r"^activation_checkpointing: moved to portable.activation.checkpointing or megatron"):
        load_train_config(path, {"activation_checkpointing": True}, check_paths=False)
