"""The import graph of idle_ray/: no cycles, no upward imports by layer, no private names across modules."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "idle_ray"
# House rule 11, bottom to top; a module may import its own layer or lower ones.
LAYERS = {
    "idle_ray": 0, "build_once": 0, "locations": 0, "config": 0, "data": 0, "eval": 0,
    "models": 1, "llm": 1, "adapter": 1,
    "results": 2,
    "train": 3,
    "tune": 4, "experiments": 4, "serve": 4, "study": 4,
    "cli": 5,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in the file, at any depth."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:  # "from idle_ray.train import storage" imports a module
                    out.append((sub, [], node.lineno))
                else:
                    out.append((base, [a.name], node.lineno))
    return [(m, names, line) for m, names, line in out if m == "jobs" or m.startswith(("idle_ray", "jobs."))]


def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    assert top in LAYERS, f"{module}: no layer for idle_ray.{top}; add it to LAYERS in {__file__}"
    return LAYERS[top]


def test_every_module_parses_and_has_a_layer():
    for name in modules():
        layer(name)


def test_no_import_cycles():
    g = graph()
    edges = {m: {t for t, _, _ in deps if t in g} for m, deps in g.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_flow_downward_and_never_into_jobs():
    bad = []
    for m, deps in graph().items():
        for target, _, line in deps:
            if target == "jobs" or target.startswith("jobs."):
                bad.append(f"{m}:{line} imports {target} (nothing in idle_ray imports jobs/)")
            elif target != "idle_ray" and layer(target) > layer(m):
                bad.append(f"{m}:{line} (layer {layer(m)}) imports {target} (layer {layer(target)})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = [f"{m}:{line} imports {target}.{n}" for m, deps in graph().items() for target, names, line in deps
           for n in names if n.startswith("_") and target != m]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from idle_ray.train import storage\n", [("idle_ray.train.storage", [], 1)]),
    ("def f():\n    from idle_ray.config import _build\n", [("idle_ray.config", ["_build"], 2)]),
    ("from . import metrics\n", [("idle_ray.eval.metrics", [], 1)]),
])
def test_the_walker_sees_module_function_and_relative_imports(tmp_path, source, expected):
    path = tmp_path / "x.py"
    path.write_text(source)
    known = {"idle_ray.train.storage", "idle_ray.eval.metrics"}
    assert imports(path, "idle_ray.eval.x", known) == expected
