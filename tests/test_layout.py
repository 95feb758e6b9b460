"""The package's shape: one dispatcher listing every stage, no import cycle between stages, test material kept
out of production code. Reads the source with `ast` (nothing is imported but the dispatcher)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kd_mlx"
# modules allowed to import kd_mlx.testing: the demo builds its tiny teacher and student with it
TESTING_USERS = {"demo", "testing"}


def _stage(module: str) -> str:
    """kd_mlx.train.loop -> train; kd_mlx.eval -> eval."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the kd_mlx modules a file imports (relative imports resolved)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("kd_mlx"):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("kd_mlx"))
    return out


def stage_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        src = _stage(_module_name(path))
        if src == "__main__":
            continue
        deps = {_stage(m) for m in _imports(path)} - {src, "kd_mlx", "__main__"}
        graph.setdefault(src, set()).update(d for d in deps if (PKG / d).exists() or (PKG / f"{d}.py").exists())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_stages():
    cycle = find_cycle(stage_graph())
    assert cycle is None, f"import cycle between stages: {' -> '.join(cycle)}"


def test_production_code_does_not_import_test_material():
    offenders = sorted(str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py")
                       if _stage(_module_name(p)) not in TESTING_USERS
                       and any(m.startswith("kd_mlx.testing") for m in _imports(p)))
    assert not offenders, f"production modules importing kd_mlx.testing: {offenders}"


def test_dispatcher_lists_every_stage_and_runs_it():
    from kd_mlx.__main__ import STAGES

    out = subprocess.run([sys.executable, "-m", "kd_mlx", "--help"], capture_output=True, text=True, check=True)
    for stage in STAGES:
        assert f"  {stage} " in out.stdout
    # every stage module exists and has a main()
    for stage, (module, _) in STAGES.items():
        path = PKG.parent / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)} | {
            t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert "main" in names, f"{module} has no main()"
    bad = subprocess.run([sys.executable, "-m", "kd_mlx", "no-such-stage"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown stage" in bad.stderr


@pytest.mark.parametrize("stage", ["eval", "store"])
def test_stage_help_same_through_dispatcher_and_module(stage):
    a = subprocess.run([sys.executable, "-m", "kd_mlx", stage, "--help"], capture_output=True, text=True, check=True)
    b = subprocess.run([sys.executable, "-m", f"kd_mlx.{stage}", "--help"], capture_output=True, text=True,
                       check=True)
    assert a.stdout == b.stdout and "Usage: python -m kd_mlx." in a.stdout


def test_imports_live_at_module_level():
    """The dispatcher imports only the chosen stage, so imports belong at the top of a module; the few inside
    functions are for optional or heavy dependencies used by one path (transformers for remote-code tokenizers,
    matplotlib's backend choice)."""
    inside = [f"{p.relative_to(PKG.parent)}:{node.lineno}"
              for p in PKG.rglob("*.py")
              for fn in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
              if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert len(inside) <= 40, f"{len(inside)} function-level imports: {inside}"
