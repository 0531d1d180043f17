"""The package's shape: imports go down the layers only, functions stay short, docs live in the repository."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "l2t_ext"
# what each layer may import from l2t_ext (itself always allowed; ``errors`` is the bottom of every layer); entry
# points (cli, demo, bench) may import all
ALLOWED = {
    "ops": {"_backend", "_C", "_C_cuda", "_build_config", "errors"},
    "lm": {"ops", "_backend", "errors"},
    "tasks": {"lm", "errors"},
    "reward": {"lm", "ops", "_backend", "errors"},
    "eval": {"lm", "tasks", "ops", "_backend", "errors"},
    "rl": {"reward", "eval", "tasks", "lm", "ops", "_backend", "errors"},
    "integrations": {"rl", "reward", "tasks", "lm", "ops", "_backend", "errors"},
}


def _layer(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path) -> set[str]:
    """The l2t_ext layers a module imports (top-level and function-level imports alike)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "l2t_ext"]
        for n in names:
            parts = n.split(".")
            if parts[0] == "l2t_ext" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_module_imports_a_layer_above_it(layer):
    bad = []
    for f in sorted((PKG / layer).rglob("*.py")):
        for dep in _imports(f) - ALLOWED[layer] - {layer}:
            bad.append(f"{f.relative_to(PKG)} imports l2t_ext.{dep}")
    assert not bad, bad


def test_functions_are_short():
    """At most 60 lines, unless a comment on the def line says why (``# long: ...``)."""
    long = []
    for f in sorted(PKG.rglob("*.py")):
        src = f.read_text().splitlines()
        for n in ast.walk(ast.parse("\n".join(src))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                if "# long:" not in src[n.lineno - 1]:
                    long.append(f"{f.relative_to(PKG)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long


def test_package_cites_only_documents_in_the_repository():
    root = PKG.parent
    cited = [f.relative_to(root) for f in PKG.rglob("*.py") if "DESIGN.md" in f.read_text()]
    assert not cited, cited
    assert (root / "docs" / "architecture.md").is_file()
