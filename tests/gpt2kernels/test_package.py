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
