"""The shape of the code: no import cycle inside genbench, and no built-in model named outside the
models, the registry's alias table and the published tables that ``reproduce`` re-runs."""
import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "genbench"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The genbench modules ``path`` imports, at its top or inside a function alike."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("genbench")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("genbench"):
                continue
            for a in node.names:  # "from . import datasets" imports a module; "from .api import X" a name
                sub = f"{target}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
    return out - {me}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PKG.rglob("*.py")}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_genbench_has_no_import_cycle():
    g = graph()
    assert "genbench.runner.plan" in g and "genbench.models.train" in g["genbench.models.diffusion"]
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def builtin_names() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["genbench.models"]
    from genbench.registry import ALIASES

    return {n for n, target in eps.items() if target.startswith("genbench.models")} | set(ALIASES)


#: where a built-in's name may stand: its own code, the registry's alias table, the published tables
ALLOWED = ("genbench/models/", "genbench/reproduce")


def named_builtins(path: Path, names: set[str], root: Path = ROOT) -> list[str]:
    """String constants in ``path`` that are a built-in model's name (docstrings left out), and, in
    the registry, any outside its alias table."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    aliases = set()
    if path.name == "registry.py":
        for n in ast.walk(tree):
            if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "ALIASES":
                aliases = {id(c) for c in ast.walk(n)}
    return [f"{path.relative_to(root)}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
            and id(n) not in docstrings and id(n) not in aliases]


def test_no_builtin_model_is_named_outside_the_models_the_alias_table_and_the_published_tables():
    names = builtin_names()
    assert {"diffusion", "vae", "cm"} <= names
    found = [hit for p in sorted(PKG.rglob("*.py")) if not str(p.relative_to(ROOT)).startswith(ALLOWED)
             for hit in named_builtins(p, names)]
    assert not found, found


def test_the_name_check_sees_a_planted_name(tmp_path):
    planted = tmp_path / "x.py"
    planted.write_text('"""diffusion in a docstring is prose."""\nMODELS = ["diffusion", "mine"]\n')
    assert named_builtins(planted, {"diffusion"}, root=tmp_path) == ["x.py:2: 'diffusion'"]


@pytest.mark.parametrize("module", ["genbench.cli", "genbench.runner.plan", "genbench.report", "genbench.plots"])
def test_the_cli_side_imports_no_torch(module):
    """The CLI, the plan, the report and the plots import no torch (the runner does, lazily)."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", module
