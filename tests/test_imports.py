"""The package's import graph: no circle (a lazy import inside a function counts too), one stated concern per module."""
import ast
import os

PACKAGE = "lomo_trainer"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: str, known) -> set[str]:
    """The package modules ``name`` imports anywhere in its file: ``from .x import y`` (y itself when it is a
    module), ``from . import x``, ``import lomo_trainer.x``."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_correctly():
    edges = graph()
    assert "lomo_trainer.errors" in edges["lomo_trainer.config"]  # from .errors import ConfigError
    assert "lomo_trainer.optim" in edges["lomo_trainer.optim.factory"]  # from . import LOMO, AdaLomo
    assert "lomo_trainer.optim.engine" in edges["lomo_trainer.optim"]  # from .engine import LOMO
    assert "lomo_trainer.lora_config" in edges["lomo_trainer.optim.adapters"]  # from ..lora_config import ...
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    found = cycles(graph())
    assert not found, f"import circles: {found}"


def test_config_is_data():
    """config reads the settings; it never imports the engine (optim/factory.py builds the optimizer)."""
    edges = graph()
    engine = {m for m in edges if m.startswith("lomo_trainer.optim")} | {"lomo_trainer.lora", "lomo_trainer.trainer"}
    seen, todo = set(), ["lomo_trainer.config"]
    while todo:
        for m in edges[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    assert not seen & engine, sorted(seen & engine)


def test_each_module_states_its_concern_in_its_first_line():
    missing = [path for path in modules().values()
               if not open(path, encoding="utf-8").readline().startswith(('"""', "'''"))]
    assert not missing, f"first line of each module must be a docstring stating its concern: {sorted(missing)}"
