"""Activation checkpointing of the first N decoder layers: the same loss and gradients as none (float64), and the
config knob that asks for it, in both recipes."""

import copy
from types import SimpleNamespace

import pytest
import torch
from test_llama import make_model, tiny_config
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from segtrain.config import ConfigError
from segtrain.train.activation_checkpoint import apply_activation_checkpointing


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels)
    loss.backward()
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("num_layers", [None, 1, 2, 5])
def test_checkpointing_the_first_layers_changes_nothing_but_memory(num_layers):
    config = tiny_config(num_layers=3, history_policy=[["all", "sink:2+window:3"], ["none", "window:5"], ["all", "none"]])
    plain = make_model(config, dtype=torch.float64).train()
    wrapped = apply_activation_checkpointing(copy.deepcopy(plain), num_layers)
    kinds = [isinstance(layer, CheckpointWrapper) for layer in wrapped.model.layers]
    assert kinds == [i < (3 if num_layers is None else num_layers) for i in range(3)]

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 101, (2, 48), generator=g), torch.randint(0, 101, (2, 48), generator=g)
    loss, grads = _loss_and_grads(plain, ids, labels)
    loss_w, grads_w = _loss_and_grads(wrapped, ids, labels)
    torch.testing.assert_close(loss_w, loss, rtol=0, atol=0)
    assert grads.keys() == grads_w.keys()  # parameter names stay loadable
    for name, grad in grads.items():
        torch.testing.assert_close(grads_w[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def _cfg(**fields):
    from segtrain.config import load_model_config
    from segtrain.train.config import TrainConfig, validate

    model = load_model_config("tiny")
    cfg = TrainConfig(model=model, **{k: v for k, v in fields.items() if k != "pp"})
    cfg.data.synthetic, cfg.data.tokenizer, cfg.data.seq_length = "passkey", "unused.model", 256
    cfg.parallel.pp = fields.get("pp", 1)
    return validate(cfg, check_paths=False)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(activation_checkpointing_layers=1), "activation_checkpointing_layers: set activation_checkpointing: true"),
        (dict(activation_checkpointing=True, activation_checkpointing_layers=0), "must be a positive integer"),
        (dict(activation_checkpointing=True, activation_checkpointing_layers=3), "more than the 2 decoder layers"),
    ],
)
def test_bad_checkpointing_layers_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**fields)


def test_megatron_recompute_follows_the_knob():
    from segtrain.train.recipes.megatron import recompute_overrides

    def cfg(on, n=None):
        return SimpleNamespace(activation_checkpointing=on, activation_checkpointing_layers=n)

    assert recompute_overrides(cfg(False)) == {}
    full = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    assert recompute_overrides(cfg(True)) == full
    assert recompute_overrides(cfg(True, 3)) == {**full, "recompute_method": "block", "recompute_num_layers": 3}
