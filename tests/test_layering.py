"""The package's import structure (DESIGN.md, "Package layout"): each layer imports only from the layers below it,
kernels/ import no other package of omnitune, and no module imports another that imports it back at import time.
A guide rather than a cage: change RANKS with the design when a new module finds its place."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "omnitune"
# lower ranks are imported by higher ones, never the other way; same rank: within a package only
RANKS = {"errors": 0, "tokens": 0, "transfer": 0, "atomic": 0, "recipe": 1, "run_dir": 2, "kernels": 2, "model": 3, "data": 4, "train": 5,
         "infer": 6, "export": 6, "eval": 7, "serve": 7, "demo": 8, "cli": 9, "__main__": 10, "__init__": 0}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC.parent).with_suffix("").parts): p for p in SRC.rglob("*.py")}


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-node.level])
            found.add(f"{package}.{node.module}" if node.module else package)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    known = modules()
    # `from omnitune.x import name`: the module x (or x.name when that is a module itself)
    return {m if m in known else m.rsplit(".", 1)[0] for m in found if m.startswith("omnitune")} & set(known)


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_each_layer_imports_only_from_layers_below_it():
    wrong = []
    for name, path in modules().items():
        for target in imports(path, top_level_only=False):
            if layer(target) == layer(name):
                continue
            if RANKS[layer(target)] >= RANKS[layer(name)]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_kernels_import_no_other_omnitune_package():
    allowed = {"omnitune.tokens", "omnitune.errors", "omnitune.transfer"}
    for name, path in modules().items():
        if layer(name) == "kernels":
            outside = {t for t in imports(path, False) if layer(t) != "kernels" and t not in allowed}
            assert not outside, f"{name} imports {outside}"


def test_no_import_cycles_at_import_time():
    graph = {}
    for name, path in modules().items():
        graph[name] = imports(path, top_level_only=True) - {name}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
