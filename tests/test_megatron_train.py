"""The training loop on the megatron model (CPU, one process, TP=PP=1): the losses of the portable model from the
same weights; checkpoints hold one megatron shard file that converts back to the exported HF weights; configs the
megatron path cannot run stop naming the field."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from train_runs import ENV, losses, train, write_config

from segtrain.config import ConfigError, load_model_config
from segtrain.parallel.groups import Layout
from segtrain.train.config import load_train_config

pytest.importorskip("megatron.core", reason="megatron-core is not installed")


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    from segtrain.checkpoint import save_pretrained
    from segtrain.models.llama import LlamaForCausalLM

    config = load_model_config("tiny", {"tie_word_embeddings": False, "attention_backend": "math"})
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("init")
    save_pretrained(LlamaForCausalLM(config), config, out)
    return out, config


@pytest.mark.slow
def test_megatron_loop_logs_the_portable_losses(tmp_path, corpus, init_dir):  # noqa: F811
    path, config = init_dir
    model = {"from": "configs/model/tiny.yaml", "tie_word_embeddings": False, "attention_backend": "math"}
    runs = {}
    for impl in ("portable", "megatron"):
        (tmp_path / impl).mkdir()
        cfg = write_config(tmp_path / impl, corpus, model=model, model_impl=impl, steps=4, save_every=4, grad_accum=2)
        train(cfg, "--init-from", os.fspath(path))
        runs[impl] = losses(tmp_path / impl / "run")
    assert list(runs["megatron"]) == [1, 2, 3, 4]
    for step, loss in runs["portable"].items():
        assert runs["megatron"][step] == pytest.approx(loss, rel=2e-4), (step, runs)

    # the checkpoint: DeepSpeed's one mp_rank_00 file per model-parallel rank, megatron names, back to the export
    from segtrain.checkpoint.run import load_megatron_shards
    from segtrain.models.megatron_adapter import megatron_to_hf

    ckpt = tmp_path / "megatron" / "run" / "checkpoints"
    shards, tp, pp = load_megatron_shards(ckpt)
    assert (tp, pp) == (1, 1) and "decoder.layers.0.self_attention.linear_qkv.weight" in shards[(0, 0)]
    meta = json.loads((ckpt / "step_00000004" / "trainer_state.json").read_text())
    assert meta["config"]["model_impl"] == "megatron"
    hf = megatron_to_hf(shards, config, tp, pp)
    exported = load_file(os.fspath(tmp_path / "megatron" / "run" / "final" / "model.safetensors"))
    assert set(hf) == set(exported)
    assert all(torch.equal(hf[k], exported[k]) for k in hf)
    # and the CLI converts the real megatron checkpoint to the same weights
    from segtrain.convert import main as convert

    assert convert("to", [os.fspath(ckpt), os.fspath(tmp_path / "hf"), "--no-progress"]) == 0
    converted = load_file(os.fspath(tmp_path / "hf" / "model.safetensors"))
    assert set(converted) == set(exported)
    assert all(torch.equal(converted[k], exported[k]) for k in converted)


@pytest.mark.parametrize(
    "fields,layout,error,match",
    [
        ({"parallel": {"tp": 2, "zero_stage": 3}}, Layout(2, 1, 1, 1), ConfigError, "parallel.zero_stage: ZeRO-3"),
        ({"parallel": {"pp": 2, "zero_stage": 0}}, Layout(1, 2, 1, 1), ConfigError, "parallel.zero_stage: 0 with parallel.pp=2"),
        ({"parallel": {"pp": 2, "zero_stage": 2}}, Layout(1, 2, 1, 1), ConfigError, "parallel.zero_stage: 2 with parallel.pp=2"),
        ({"parallel": {"pp": 2, "zero_stage": 1}}, Layout(1, 2, 1, 1), ConfigError, "model.tie_word_embeddings"),
        ({"parallel": {"tp": 4}}, Layout(4, 1, 1, 1), ConfigError, "model.num_kv_heads: 2 is not a multiple of parallel.tp=4"),
        ({"model_impl": "megaton"}, None, ConfigError, "model_impl: must be"),
        ({"model_impl": "megatron", "megatron": {"fusions": "yes"}}, None, ConfigError, "megatron.fusions: expected true or"),
        ({"model_impl": "megatron", "fp8": None}, None, ConfigError, r"^fp8: moved to megatron.fp8 \(docs/train-options.md\)$"),
    ],
)
def test_megatron_configs_that_cannot_run_name_the_field(tmp_path, corpus, fields, layout, error, match):  # noqa: F811
    from segtrain.train.recipes import recipe_for, uses_megatron

    flat = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            flat.update({f"{key}__{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    path = write_config(tmp_path, corpus, **flat)
    with pytest.raises(error, match=match):
        cfg = load_train_config(path)
        assert uses_megatron(cfg)
        recipe_for(cfg).check(cfg, layout)


def test_build_options_follow_the_megatron_section():
    from segtrain.train.recipes.megatron import FP8_DEFAULTS, MegatronActivation, MegatronConfig, build_options

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert build_options(MegatronConfig(), cuda) == {"use_te": None, "fused": True, "use_cpu_initialization": False}
    assert build_options(MegatronConfig(fusions=False), cuda)["fused"] is False
    assert build_options(MegatronConfig(), cpu) == {"use_te": None, "fused": False, "use_cpu_initialization": True}
    options = build_options(MegatronConfig(fp8=dict(FP8_DEFAULTS), activation=MegatronActivation(True, 2)), cuda)
    assert options["use_te"] is True and options["fp8"] == "hybrid" and options["fp8_amax_history_len"] == 1024
    assert options["recompute_method"] == "block" and options["recompute_num_layers"] == 2


ONE_F_ONE_B = r"""
import os, sys, json, torch
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from segtrain.train.recipes.megatron import MegatronRecipe
deepspeed_overrides = MegatronRecipe().deepspeed_overrides
deepspeed.init_distributed("gloo", verbose=False)
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
x = torch.randn(4, 8)
out = {}
for stage in (1, 2):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model.load_state_dict(base.state_dict())
    cfg = type("C", (), {"parallel": type("P", (), {"pp": 2})(), "micro_batch_size": 1, "grad_accum": 4})()
    ds = {**deepspeed_overrides(cfg), "zero_optimization": {"stage": stage}, "gradient_clipping": 1e9,
          "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    o, xs = {}, x.split(1)  # 1F1B on the first of two stages: F0 F1 B0 F2 B1 F3 B2 B3
    o[0] = engine(xs[0]); o[1] = engine(xs[1]); o[0].backward(torch.ones_like(o[0]))
    o[2] = engine(xs[2]); o[1].backward(torch.ones_like(o[1]))
    o[3] = engine(xs[3]); o[2].backward(torch.ones_like(o[2])); o[3].backward(torch.ones_like(o[3]))
    engine.step()
    out[stage] = float(engine.get_global_grad_norm())
base(x).sum().backward()
out["reference"] = float(torch.cat([p.grad.flatten() for p in base.parameters()]).norm())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_deepspeed_unmanaged_zero1_accumulates_1f1b_backwards_exactly():
    """Why PP needs ZeRO-1: the PP step's DeepSpeed settings, with backwards in 1F1B order (two forwards pending)."""
    import subprocess
    import sys

    from segtrain.parallel.groups import _free_port

    env = {**ENV, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", ONE_F_ONE_B, str(_free_port())], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    norms = json.loads(run.stdout.strip().splitlines()[-1])
    assert norms["1"] == pytest.approx(norms["reference"], rel=1e-5)
    assert norms["2"] != pytest.approx(norms["reference"], rel=1e-2)  # DeepSpeed 0.19.8: ZeRO-2 loses gradients here


def test_megatron_runs_tp_pp_times_cp_and_reset_position_ids(tmp_path, corpus):  # noqa: F811
    """CP combines with TP and PP (the recipe's check accepts TP=PP=CP=2), and RoPE takes the data's positions: with
    reset_position_ids each sample's positions restart after every EOD, a CP shard keeps them, and the recipe hands
    them to the model (whose RoPE runs at them: test_megatron.py::test_rope_runs_at_position_ids_per_row)."""
    from segtrain.data.tokenizer import EOS_ID
    from segtrain.parallel.apply import shard_batch
    from segtrain.train.data import build_train_dataset
    from segtrain.train.recipes import recipe_for
    from segtrain.train.recipes.megatron import MegatronRecipe

    fields = dict(parallel__tp=2, parallel__pp=2, parallel__cp=2, parallel__zero_stage=1, data__reset_position_ids=True,
                  model={"from": "configs/model/tiny.yaml", "tie_word_embeddings": False})  # fmt: skip
    cfg = load_train_config(write_config(tmp_path, corpus, **fields))
    recipe = recipe_for(cfg)
    assert isinstance(recipe, MegatronRecipe)
    recipe.check(cfg, Layout(tp=2, pp=2, cp=2, dp=1))  # raises, naming the field, for a layout it cannot run

    data = build_train_dataset(cfg, 2)
    batch = {key: torch.stack([torch.as_tensor(data[i][key]) for i in range(2)]) for key in ("tokens", "labels", "position_ids")}
    restarts = 0
    for tokens, positions in zip(batch["tokens"].tolist(), batch["position_ids"].tolist()):
        assert positions[0] == 0
        for t in range(1, len(tokens)):
            after_eod = tokens[t - 1] == EOS_ID
            assert positions[t] == (0 if after_eod else positions[t - 1] + 1), (t, tokens[t - 1], positions[t - 1 : t + 1])
            restarts += after_eod
    assert restarts > 0, "no document ended inside a sample: the check saw no reset"

    seen = []

    def engine(tokens, positions, attention_mask, labels):  # the model's place: what the recipe passes it
        seen.append(positions)
        return torch.zeros(labels.shape)

    for rank in range(2):  # the two CP shards of the sequence
        recipe.per_token_loss(engine, shard_batch(batch, [(0, 64), (64, 128)], rank))
    assert torch.equal(torch.cat(seen, dim=1), batch["position_ids"])
