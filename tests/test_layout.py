"""The library stands apart from its applications: nothing in `bilstm_fast`'s top level or in
`kernels/` imports `bilstm_fast.apps`, so a user of FastBiLSTM never loads MNIST or text code."""
import ast
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
LIBRARY = sorted([*(CHECKOUT / "bilstm_fast").glob("*.py"), *(CHECKOUT / "kernels").glob("*.py")])


def imported_modules(path):
    """Every module an import statement in the file names, lazy imports inside functions included."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


def is_app(name):
    return name.startswith("bilstm_fast.apps") or name.lstrip(".").startswith("apps")


@pytest.mark.skipif(not (CHECKOUT / "kernels").is_dir(), reason="needs the source checkout")
@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_library_does_not_import_the_applications(path):
    assert not [name for name in imported_modules(path) if is_app(name)]


def test_the_check_sees_an_application_import(tmp_path):
    """The scan above must be able to fail: each way of spelling the import is caught."""
    for line in ("from bilstm_fast.apps import data", "import bilstm_fast.apps.textgen",
                 "def f():\n    from .apps.train_mnist import main", "from bilstm_fast import apps"):
        source = tmp_path / "m.py"
        source.write_text(line + "\n", encoding="utf-8")
        assert any(is_app(name) for name in imported_modules(source)), line
