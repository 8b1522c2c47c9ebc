"""Only the portable assembly (segtrain/speed/portable.py) changes a built model's code: nothing else in segtrain/ or
tools/ assigns a callable to a module's attribute or replaces a ``forward``, and after assembly no module carries a
``forward`` of its own; the assembled model keeps its parameter names in its state dict."""

import ast
import copy
from pathlib import Path

import pytest
import torch
from tiny_models import checkpointed, loss_and_grads, make_model, tiny_config, tiny_train_config
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
ASSEMBLY = ROOT / "segtrain/speed/portable.py"


def _model_methods() -> set[str]:
    """Every method name of a class in segtrain/models/ (the code a model instance runs), and ``forward``."""
    names = {"forward"}
    for path in (ROOT / "segtrain/models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names |= {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


def _replacements(tree: ast.AST, methods: set[str]) -> list[str]:
    """``x.<model method> = ...`` and ``setattr(x, "<model method>" or a computed name, <function-like>)``: the forms
    that replace a method on a live model object."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if not isinstance(target, ast.Attribute) or target.attr not in methods:
                    continue
                if target.attr == "forward" or ast.unparse(target.value) != "self":  # an object's own attribute is not one
                    found.append(f"line {node.lineno}: {ast.unparse(target)} = {ast.unparse(node.value)[:60]}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and len(node.args) == 3:
            name, value = node.args[1], node.args[2]
            named = isinstance(name, ast.Constant) and name.value in methods
            if named or (not isinstance(name, ast.Constant) and _function_like(value)):
                found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def _function_like(value: ast.expr) -> bool:
    """A lambda, or a call that makes a function from another (compile, partial, ``types.MethodType``)."""
    if isinstance(value, ast.Lambda):
        return True
    return isinstance(value, ast.Call) and any(w in ast.unparse(value.func) for w in ("compile", "partial", "MethodType"))


def test_the_scan_finds_what_it_looks_for():
    methods = _model_methods()
    assert {"forward", "before_attention", "after_attention", "_chunk_ce"} <= methods
    code = "model.forward = f\nlayer.before_attention = torch.compile(layer.before_attention)\nsetattr(m, name, partial(h))\n"
    code += "setattr(layer, 'after_attention', g)\nmodel._chunk_ce = compile_region(model._chunk_ce)\n"
    assert len(_replacements(ast.parse(code), methods)) == 5
    assert (
        _replacements(
            ast.parse(
                "self.before = compile_region(fn, backend)\nx.weight = y\nstop.hook = lambda: 1\nsetattr(m, n, Linear())\n"
            ),
            methods,
        )
        == []
    )


def test_no_method_is_replaced_outside_the_assembly():
    files = [*sorted((ROOT / "segtrain").rglob("*.py")), *sorted((ROOT / "tools").glob("*.py"))]
    methods, wrong = _model_methods(), []
    for path in files:
        if path == ASSEMBLY:
            continue
        wrong += [f"{path.relative_to(ROOT)} {hit}" for hit in _replacements(ast.parse(path.read_text()), methods)]
    assert not wrong, "methods replaced on live objects (apply them in segtrain/speed/portable.py):\n" + "\n".join(wrong)


def _replaced_methods(model: nn.Module) -> list[str]:
    """``module.attr`` for every method of a module's class that the instance shadows with a callable of its own."""
    return [
        f"{name}.{attr}" if name else attr
        for name, module in model.named_modules()
        for attr, value in vars(module).items()
        if callable(value) and callable(getattr(type(module), attr, None))
    ]


def test_after_assembly_no_module_has_a_forward_of_its_own():
    plain = make_model(tiny_config(num_layers=3, history_policy=[["all", "none"]] * 3), dtype=torch.float64)
    assert _replaced_methods(plain) == []
    patched = copy.deepcopy(plain)
    patched.model.layers[1].forward = patched.model.layers[1].forward  # what the check is for
    assert _replaced_methods(patched) == ["model.layers.1.forward"]
    for options in (dict(), dict(keep_attention=2), dict(keep_attention=2, keep_matmuls=1, offload=True), dict(layers=1)):
        model = checkpointed(copy.deepcopy(plain), compile=True, backend="aot_eager", **options)
        # the compiled loss chunk is the one function the assembly sets on the model itself
        assert _replaced_methods(model) == ["_chunk_ce"], options
        assert all(type(layer).__module__ == "segtrain.speed.portable" for layer in model.model.layers)  # its wrappers
        assert model.state_dict().keys() == plain.state_dict().keys()  # a checkpoint loads into a plain model
        reloaded = make_model(tiny_config(num_layers=3, history_policy=[["all", "none"]] * 3), dtype=torch.float64)
        reloaded.load_state_dict(model.state_dict())
        model.load_state_dict(plain.state_dict())  # and back


@pytest.mark.gpu
def test_the_recipe_assembles_the_shipped_levers_on_gpu():
    """The portable recipe on CUDA, as configs/train/llama3.2-1b-32k.yaml runs it (compile and fused_loss auto, keep
    attention, offload; here also keep_matmuls): the plain bf16 model's loss and gradients, through the one assembly."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from types import SimpleNamespace

    from segtrain.models.llama import LlamaForCausalLM
    from segtrain.train.recipes.portable import PortableRecipe

    torch._dynamo.reset()
    activation = {"checkpointing": True, "keep_attention": 2, "keep_matmuls": 1, "offload": True}
    cfg = tiny_train_config(portable={"activation": activation})
    cuda, recipe = torch.device("cuda"), PortableRecipe()
    torch.manual_seed(0)
    model = recipe.build(cfg, SimpleNamespace(layout=SimpleNamespace(cp=1)), cuda, torch.bfloat16, None).train()
    torch.manual_seed(0)
    plain = LlamaForCausalLM(cfg.model).to(device=cuda, dtype=torch.bfloat16).train()
    assert recipe.fused_loss and _replaced_methods(model) == ["_chunk_ce"]
    assert [layer.checkpoint for layer in model.model.layers] == ["around_attention"] * cfg.model.num_layers
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_length), generator=g).cuda()
    labels = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_length), generator=g).cuda()
    loss, grads = loss_and_grads(plain, ids, labels)
    model.zero_grad(set_to_none=True)
    loss_a = recipe.micro_loss(model, dict(tokens=ids, labels=labels))
    loss_a.backward()
    grads_a = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(loss_a.float(), loss.float(), rtol=1e-2, atol=0)  # bf16 rounding, inductor's fusions
    assert grads.keys() == grads_a.keys()
    for name, grad in grads.items():
        rel = (grads_a[name].float() - grad.float()).norm() / grad.float().norm()
        assert rel < 3e-2, f"{name}: relative gradient error {rel:.3g}"
