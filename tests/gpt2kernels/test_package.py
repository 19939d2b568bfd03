"""gpt2kernels stands alone (other projects import it without the engine) and under its own name:
``kernels`` is Hugging Face's package, which transformers >= 5.23 installs and imports."""

import ast
import subprocess
import sys
from pathlib import Path

import gpt2kernels

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(gpt2kernels.__file__).resolve().parent


def test_import_does_not_import_engine():
    code = ("import sys, gpt2kernels; import gpt2kernels.aot, gpt2kernels._extension; "
            "print(sorted(m for m in sys.modules if m == 'engine' or m.startswith('engine.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_imports_engine_or_a_top_level_kernels():
    """Also the imports inside functions, which the import above does not run."""
    for path in sorted(PACKAGE.glob("*.py")):
        tops = {name.split(".")[0] for name in _imported_modules(path)}
        assert not tops & {"engine", "kernels"}, f"{path.name} imports {sorted(tops & {'engine', 'kernels'})}"


def test_no_package_of_ours_named_kernels():
    """A folder named kernels/ at the root would shadow Hugging Face's whenever the root is on sys.path."""
    assert PACKAGE == ROOT / "gpt2kernels"
    assert not (ROOT / "kernels").exists()
    assert not (ROOT / "kernels.py").exists()


# --- what a user of the package sees ------------------------------------------------------------------
TRITON_OPS = ["layer_norm", "add_layer_norm", "linear", "gelu_mlp", "ln_linear", "ln_linear_argmax", "ln_qkv_append",
              "flash_attention", "decode_attention", "decode_embed", "apply_penalties", "cross_entropy",
              "linear_cross_entropy"]


def test_every_triton_op_is_public_with_a_reference():
    ops = {name for name in gpt2kernels.__all__ if hasattr(getattr(gpt2kernels, name), "op")}
    # cross_entropy and linear_cross_entropy are plain functions; matmul (the backward's GEMM) and
    # flash_attention_with_lse (flash_attention's op, with the lse) are ops beside them
    assert ops == set(TRITON_OPS) - {"cross_entropy", "linear_cross_entropy"} | {"matmul", "flash_attention_with_lse"}
    assert callable(gpt2kernels.matmul_ref)
    for name in TRITON_OPS:
        assert callable(getattr(gpt2kernels, f"{name}_ref")), name


def test_help_shows_each_ops_own_signature_and_docstring():
    """Not torch's CustomOpDef boilerplate and ``(*args, **kwargs)``, as help() on a registered op would."""
    import inspect
    import pydoc

    for name in TRITON_OPS:
        fn = getattr(gpt2kernels, name)
        params = inspect.signature(fn).parameters
        assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()), name
        assert list(params)[0] in ("x", "q", "tokens", "logits", "hidden"), (name, list(params))
        text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
        assert "CustomOpDef" not in text and "Returns" in text and f"{name}(" in text, text[:300]
    assert inspect.signature(gpt2kernels.layer_norm).parameters["eps"].default == 1e-5


def test_each_op_on_cpu_tensors_outside_the_interpreter_says_what_to_do():
    """Without TRITON_INTERPRET, Triton itself would fail with "0 active drivers ([])": every op,
    called directly or through torch.ops, raises one ValueError naming itself, the device and the
    three ways out."""
    code = """
import torch, gpt2kernels
x, w, b = torch.randn(3, 64), torch.ones(64), torch.zeros(64)
q, kc = torch.randn(1, 2, 1, 32), torch.zeros(1, 2, 8, 32)
lens = torch.ones(1, dtype=torch.int32)
calls = {
    "layer_norm": lambda: gpt2kernels.layer_norm(x, w, b, 1e-5),
    "add_layer_norm": lambda: gpt2kernels.add_layer_norm(x, x, w, b),
    "linear": lambda: gpt2kernels.linear(x, torch.randn(5, 64)),
    "gelu_mlp": lambda: gpt2kernels.gelu_mlp(x, torch.randn(8, 64), torch.zeros(8), torch.randn(64, 8), b),
    "ln_linear": lambda: gpt2kernels.ln_linear(x, w, b, torch.randn(5, 64)),
    "ln_linear_argmax": lambda: gpt2kernels.ln_linear_argmax(x, w, b, torch.randn(5, 64),
                                                               torch.zeros(3, dtype=torch.long)),
    "ln_qkv_append": lambda: gpt2kernels.ln_qkv_append(x[:1], w, b, torch.randn(192, 64), torch.zeros(192),
                                                       kc, kc.clone(), lens),
    "flash_attention": lambda: gpt2kernels.flash_attention(q, q, q),
    "decode_attention": lambda: gpt2kernels.decode_attention(q, kc, kc, lens),
    "decode_embed": lambda: gpt2kernels.decode_embed(torch.zeros(1, dtype=torch.long), lens, x, x),
    "apply_penalties": lambda: gpt2kernels.apply_penalties(x, torch.zeros(3, 64, dtype=torch.int32),
                                                           torch.zeros(3, 64, dtype=torch.bool),
                                                           torch.zeros(3, dtype=torch.long), torch.ones(3),
                                                           torch.zeros(3), torch.zeros(3)),
    "cross_entropy": lambda: gpt2kernels.cross_entropy(x, torch.zeros(3, dtype=torch.long)),
    "linear_cross_entropy": lambda: gpt2kernels.linear_cross_entropy(x, torch.randn(7, 64),
                                                                     torch.zeros(3, dtype=torch.long)),
    "torch.ops": lambda: torch.ops.gpt2engine.layer_norm(x, w, b, 1e-5),
}
for name, call in calls.items():
    try:
        call()
        print(name, "NO ERROR")
    except Exception as e:
        print(name, "|", type(e).__name__, "|", str(e).replace(chr(10), " "))
"""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert set(lines) == set(TRITON_OPS) | {"torch.ops"}, out.stdout + out.stderr
    for name, line in lines.items():
        op = "layer_norm" if name == "torch.ops" else name
        kind, message = line.removeprefix("| ").split(" | ", 1)
        assert kind == "ValueError", (name, line)
        for part in (f"gpt2kernels.{op} runs Triton", "on cpu", "CUDA tensors", "TRITON_INTERPRET=1",
                     f"gpt2kernels.{op}_ref"):
            assert part in message, (name, part, message)
