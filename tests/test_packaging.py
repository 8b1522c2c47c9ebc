"""Every package in the source tree is installed, and kernels/ is importable as segtrain.kernels only."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "segtrain").rglob("__init__.py")}
    assert on_disk | {"segtrain.kernels"} == set(tool["packages"])
    assert "kernels" not in tool["packages"] and "package-dir" not in tool


def test_segtrain_kernels_is_the_top_level_folder():
    """One copy of the Triton sources: ``segtrain/kernels`` links to ``kernels/`` (a wheel copies the files)."""
    link = ROOT / "segtrain" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()


def _run_from_root(code: str) -> str:
    """Run ``python -c code`` as a user standing in the clone would: the repository root is on sys.path."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_kernels_folder_is_not_an_import_name_of_ours():
    """``kernels/`` has no ``__init__.py``, so from the repository root ``import kernels`` finds the ecosystem's package
    (transformers imports it) whenever it is installed; our Triton sources are reachable only as ``segtrain.kernels``."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    out = _run_from_root(
        "import importlib.metadata as md, importlib.util as u, sys\n"
        "assert sys.path[0] == ''\n"
        "s = u.find_spec('kernels')\n"
        "try:\n    md.version('kernels'); installed = True\nexcept md.PackageNotFoundError:\n    installed = False\n"
        "print(installed, s.origin if s else None, list(s.submodule_search_locations or []) if s else [])\n"
        "import segtrain.kernels.decode_attention as d; print(d.__file__)\n"
    )
    first, kernel_file = out.splitlines()
    installed, origin, _ = first.split(" ", 2)
    assert kernel_file.endswith(str(Path("kernels") / "decode_attention.py"))
    if installed == "True":  # the ecosystem's package wins over our folder, whatever sys.path's order
        assert origin != "None" and not origin.startswith(str(ROOT / "kernels")), origin
    else:  # without it Python makes a namespace of any folder named kernels: empty, and no distribution claims it
        assert origin == "None"


def test_transformers_loads_a_llama_from_the_repository_root(tmp_path):
    """The failure a new user met: ``from_pretrained`` run from the clone imported our folder as ``kernels``."""
    out = _run_from_root(
        "import torch, transformers as t\n"
        "c = t.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1)\n"
        f"t.LlamaForCausalLM(c).save_pretrained({str(tmp_path)!r})\n"
        f"m = t.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(type(m).__name__, m(torch.tensor([[1, 2, 3]])).logits.shape)\n"
    )
    assert out.splitlines()[-1].split() == ["LlamaForCausalLM", "torch.Size([1,", "3,", "64])"]
