"""The tiny Llama the CPU tests build: one config factory and one model factory, so a file states only how its
model differs (``functools.partial(tiny_config, segment_size=8)``) instead of repeating the whole config."""

import torch

from segtrain.config import ModelConfig
from segtrain.models.llama import LlamaForCausalLM

MIXED = [["all", "sink:2+window:3"], ["none", "window:5"]]  # every kind of policy, different per layer


def tiny_config(**fields) -> ModelConfig:
    base = dict(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_layers=2,
        num_heads=6,
        num_kv_heads=2,
        segment_size=16,
        history_policy=MIXED,
        initializer_range=0.3,  # peaky attention and spread logits: masking errors show
    )
    return ModelConfig(**{**base, **fields})


def make_model(config: ModelConfig, seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def spread_norms(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Norm weights away from 1 (from the global generator), so a swapped or dropped norm shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def loss_and_grads(model, ids, labels):
    """The loss and every parameter's gradient, named as in the unwrapped model (checkpoint wrappers removed)."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels)
    loss.backward()
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}


def tiny_train_config(pp: int = 1, zero_stage: int = 1, **fields):
    """A validated TrainConfig of configs/model/tiny.yaml on synthetic passkey data (no paths checked)."""
    from segtrain.config import load_model_config
    from segtrain.train.config import TrainConfig, validate

    cfg = TrainConfig(model=load_model_config("tiny"), **fields)
    cfg.data.synthetic, cfg.data.tokenizer, cfg.data.seq_length = "passkey", "unused.model", 256
    cfg.parallel.pp, cfg.parallel.zero_stage = pp, zero_stage
    return validate(cfg, check_paths=False)
