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


def documents_config(**overrides) -> ModelConfig:
    """The smaller model in document mode (math backend) that tests/test_documents*.py check against each document run
    alone, at :data:`DOCUMENTS_FORWARD`."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                segment_size=4, history_policy=[["all", "sink:2+window:3"], ["window:5", "none"]],
                attention_backend="math", documents=True)  # fmt: skip
    return ModelConfig(**{**base, **overrides})


DOCUMENTS_FORWARD = dict(rtol=0, atol=1e-12)  # float64 logits: packed documents against each run alone


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


def tiny_train_config(pp: int = 1, zero_stage: int = 1, model_impl: str = "portable", **sections):
    """A validated TrainConfig of configs/model/tiny.yaml on synthetic passkey data (no paths checked); ``sections``:
    ``portable=`` / ``megatron=`` mappings, as in a YAML file."""
    from segtrain.config import from_dict, load_model_config
    from segtrain.train.config import TrainConfig, validate

    raw = {"model": load_model_config("tiny").to_dict(), "model_impl": model_impl, **sections}
    raw["data"] = {"synthetic": "passkey", "tokenizer": "unused.model", "seq_length": 256}
    raw["parallel"] = {"pp": pp, "zero_stage": zero_stage}
    return validate(from_dict(TrainConfig, raw, where=""), check_paths=False)


def portable_train_config(zero_stage: int = 1, model_impl: str = "portable", **portable):
    """:func:`tiny_train_config` with ``portable`` options (``compile``, ``fused_loss``) given as keywords."""
    return tiny_train_config(zero_stage=zero_stage, model_impl=model_impl, **({"portable": portable} if portable else {}))


def checkpointed(model, layers=None, keep_attention=0, keep_matmuls=0, offload=False, compile=False, **options):
    """``model`` assembled with activation checkpointing (compiled regions: ``compile``, ``backend=`` in ``options``)."""
    from segtrain.speed.portable import ActivationOptions, parallelize_portable

    activation = ActivationOptions(True, layers, keep_attention, keep_matmuls, offload)
    return parallelize_portable(model, compile=compile, activation=activation, **options)
