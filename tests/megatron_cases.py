"""The megatron model on CPU against the portable model in float64, shared by the megatron test files: one process
(tests/test_megatron.py, tests/test_documents_megatron.py) and context parallelism over spawned gloo ranks
(tests/test_megatron_cp.py, tests/test_documents_megatron_cp.py). Import it after ``pytest.importorskip("megatron.core")``.
"""

import contextlib
import dataclasses
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from segtrain.config import ModelConfig
from segtrain.models.llama import LlamaForCausalLM
from segtrain.models.megatron_adapter import hf_to_megatron
from segtrain.train.recipes.megatron import MegatronRecipe


def portable_and_megatron(config: ModelConfig):
    """Portable model with random weights (norms too) and the megatron model loaded with the same weights, float64."""
    from segtrain.models.megatron import build_gpt_model

    torch.manual_seed(0)
    ref = LlamaForCausalLM(config).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    model = build_gpt_model(config, dtype=torch.float64, use_cpu_initialization=True)
    missing, unexpected = model.load_state_dict(hf_to_megatron(ref.state_dict(), config, 1, 1)[(0, 0)], strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return ref, model


# ---- context parallelism: one step of a TP x PP x CP layout on this rank ----------------------------------------------

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, segment_size=4,
              attention_backend="math", history_policy=[["all", "sink:2+window:3"], ["none", "window:5"]], rope_theta=100.0,
              tie_word_embeddings=False)  # fmt: skip
T, MICRO = 30, 2  # 8 segments, the last one partial; two micro-batches of one sequence


class Float64Recipe(MegatronRecipe):
    """The megatron recipe with a float64 cross-entropy over gathered logits: megatron's vocab-parallel cross-entropy
    runs in float32, which would hide float64 exactness of the parallel step behind float32 rounding."""

    def per_token_loss(self, engine, batch):
        from megatron.core import parallel_state as ps

        out = engine(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
        if not ps.is_pipeline_last_stage():
            return out  # a stage's hidden states, sent on by the schedule
        return F.cross_entropy(out.transpose(1, 2), batch["labels"].clamp(min=0), reduction="none")


def make_inputs():
    """The portable model's float64 weights (norms random too) and the micro-batches (labels partly ignored, a loss mask)."""
    config = ModelConfig(**CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(1)
    batches = []
    for m in range(MICRO):
        tokens = torch.randint(0, config.vocab_size, (1, T), generator=g)
        labels = torch.randint(0, config.vocab_size, (1, T), generator=g)
        labels[:, :5] = -100
        batch = {"tokens": tokens, "labels": labels}
        if m == 1:
            batch["loss_mask"] = (torch.rand(1, T, generator=g) > 0.3).long()
        batches.append(batch)
    return config, model, batches


def single_device(model, batches):
    """Logits, the mean of the micro-batch losses and its gradients (HF names) on one device."""
    loss = sum(model(b["tokens"], labels=b["labels"], loss_mask=b.get("loss_mask")) for b in batches) / len(batches)
    loss.backward()
    with torch.no_grad():
        logits = torch.cat([model(b["tokens"]) for b in batches])
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def rank_logits(model, recipe, batches, hidden_size: int):
    """This rank's logits of its shard of every micro-batch (last PP stage; None elsewhere), stage by stage."""
    from megatron.core import parallel_state as ps

    pp_group, out, weight = ps.get_pipeline_model_parallel_group(), [], next(model.parameters())
    with torch.no_grad():
        for batch in batches:
            shard = recipe.shard(batch)
            if not ps.is_pipeline_first_stage():
                hidden = weight.new_empty(shard["tokens"].shape[1], 1, hidden_size)
                dist.recv(hidden, group=pp_group, group_src=0)
                model.set_input_tensor(hidden)
            y = model(shard["tokens"], shard["position_ids"], None, runtime_gather_output=True)
            if not ps.is_pipeline_last_stage():
                dist.send(y.contiguous(), group=pp_group, group_dst=1)
            out.append(y)
    return torch.cat(out) if ps.is_pipeline_last_stage() else None


def run_layout(state, batches, device, dtype, tp, pp, cp, balance, offload, recipe_loss=False, documents=False):
    """One step's forward and backward through the recipe (micro-batch losses, or the 1F1B schedule under PP), then the
    logits; in float64 with :class:`Float64Recipe`, or with the recipe itself (megatron's vocab-parallel cross-entropy,
    float32, over the TP group; labels clamped) in float32 or with ``recipe_loss``. ``documents``: the model of
    :data:`CONFIG` in document mode (the batches carry each document's ``position_ids``)."""
    from megatron.core import parallel_state as ps

    from segtrain.compat.megatron_core import cpu_collectives
    from segtrain.models.megatron import build_gpt_model, init_model_parallel
    from segtrain.parallel.groups import build_groups, make_layout

    config, on_cpu = ModelConfig(**{**CONFIG, "documents": documents}), device.type == "cpu"
    init_model_parallel(tp, pp, cp)
    try:
        groups = build_groups(make_layout(dist.get_world_size(), tp, pp, cp))
        here = groups.coords
        model = build_gpt_model(config, tp=tp, pp=pp, dtype=dtype, use_cpu_initialization=on_cpu).to(device)
        missing, unexpected = model.load_state_dict(hf_to_megatron(state, config, tp, pp)[(here["tp"], here["pp"])], strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        recipe = Float64Recipe() if dtype == torch.float64 and not recipe_loss else MegatronRecipe()
        parallel = SimpleNamespace(cp_balance=balance, cp_balance_cap=None, offload_history=offload)
        cfg = SimpleNamespace(model=config, data=SimpleNamespace(seq_length=T), parallel=parallel)
        recipe.apply_context_parallel(model, cfg, groups)
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        with cpu_collectives() if on_cpu else contextlib.nullcontext():  # megatron's TP gather of the logits
            if pp == 1:
                loss = sum(recipe.micro_loss(model, b) for b in batches) / len(batches)
                loss.backward()
                loss = loss.detach().double()
            else:
                loss = recipe.pipeline_forward_backward(model, batches) / len(batches)
            sent = dataclasses.replace(recipe.cp.stats)  # one step; the logits pass below sends again
            offloaded = recipe.cp.offload.settle().offloaded if offload else 0
            logits = rank_logits(model, recipe, batches, config.hidden_size)
        grads = {k: p.grad.cpu() for k, p in model.named_parameters()}
        logits = None if logits is None else logits.cpu()
        return dict(coords=here, ranges=recipe.cp.ranges, loss=loss.cpu(), logits=logits, grads=grads, stats=sent,
                    offloaded=offloaded)  # fmt: skip
    finally:
        ps.destroy_model_parallel()


def near(got: torch.Tensor, want: torch.Tensor, tol, what: str) -> None:
    """``tol``: ``(atol, rtol)`` elementwise, or a bound on the relative norm of the difference."""
    if isinstance(tol, tuple):
        torch.testing.assert_close(got, want, atol=tol[0], rtol=tol[1], msg=what)
    else:
        rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert rel < tol, (what, rel)


def check_gathered(runs: list[dict], layout: dict, config: ModelConfig, reference: tuple, tol: dict) -> None:
    """One layout's ranks (``runs``: what each rank returned, with its ``coords``) against ``reference`` = (logits,
    loss, grads) of one device: the CP shards' logits side by side, their losses and gradients averaged over CP, the
    TP x PP shards of the gradients put back together under HF names."""
    from segtrain.models.megatron_adapter import megatron_to_hf

    by = {(r["coords"]["tp"], r["coords"]["pp"], r["coords"]["cp"]): r for r in runs}
    logits, loss, grads = reference
    cp, last = layout["cp"], layout["pp"] - 1
    for t in range(layout["tp"]):
        got = torch.cat([by[(t, last, c)]["logits"] for c in range(cp)], 1)  # shards side by side along the sequence
        near(got, logits, tol["logits"], "logits")
        # each CP rank backpropagates CP x its share (gradients are averaged over DP x CP): the shares sum to the loss
        near(sum(by[(t, last, c)]["loss"] for c in range(cp)) / cp, loss, tol["loss"], "loss")
    shards = {(t, p): {k: sum(by[(t, p, c)]["grads"][k] for c in range(cp)) / cp for k in by[(t, p, 0)]["grads"]}
              for t in range(layout["tp"]) for p in range(layout["pp"])}  # fmt: skip
    got = megatron_to_hf(shards, config, layout["tp"], layout["pp"])
    assert set(got) == set(grads)
    for k, want in grads.items():
        near(got[k], want, tol["grads"], k)


FLOAT64 = {"logits": (1e-12, 0.0), "loss": (1e-12, 0.0), "grads": (1e-12, 1e-10)}  # the CP tests' (test_parallel_model.py)
