"""The layering ARCHITECTURE.md promises, checked on the source: one-way imports, no cycles.

Every import counts, including ones deferred into a function body or kept under
`if TYPE_CHECKING:` (they hide cycles, they do not remove them).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lorafit"
# Lowest first: a module may import from its own layer and the layers before it, never after.
LAYERS = [
    "atomic",
    "quant",
    "tuner",
    "models",
    "data",
    "ops",
    "tasks",
    "train",
    "infer",
    "export",
    "serve",
    "cli",
]
TOP = {
    "lorafit",
    "lorafit.__main__",
}  # the public facade and `python -m lorafit`: nothing imports them


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lorafit modules `name` imports (a `from pkg import sub` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [(base, [a.name for a in node.names])]
        else:
            continue
        for base, names in targets:
            if base != "lorafit" and not base.startswith("lorafit."):
                continue
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            found.update(subs or [base])
            if len(subs) < len(names):
                found.add(base)
    found.discard(name)
    return {m for m in found if m in modules}


def layer_of(name: str) -> int | None:
    if name in TOP:
        return None
    return LAYERS.index(name.split(".")[1])


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_belongs_to_a_layer():
    unknown = [m for m in all_modules() if m not in TOP and m.split(".")[1] not in LAYERS]
    assert not unknown, f"add these to LAYERS (and ARCHITECTURE.md): {unknown}"


def test_imports_only_go_down_the_layers():
    wrong = []
    for name, deps in graph().items():
        mine = layer_of(name)
        for dep in deps:
            if dep in TOP:
                wrong.append(f"{name} imports the facade {dep}")
            elif mine is not None and layer_of(dep) > mine:
                wrong.append(f"{name} ({LAYERS[mine]}) imports {dep} ({LAYERS[layer_of(dep)]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_architecture_md_lists_the_layers_in_order():
    text = (SRC.parent / "ARCHITECTURE.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("atomic"))
    assert re.findall(r"[a-z_]+", line) == LAYERS


def test_the_checker_sees_deferred_imports_and_cycles(tmp_path):
    # The checks above must be able to fail: a deferred upward import and a two-module cycle.
    code = "def f():\n    from lorafit.cli import main\n"
    path = tmp_path / "mod.py"
    path.write_text(code)
    assert imports_of("lorafit.tuner.mod", path, {"lorafit.cli": path}) == {"lorafit.cli"}
    assert layer_of("lorafit.cli") > layer_of("lorafit.tuner.mod")


def package_imports() -> dict[str, set[str]]:
    """{package: the other packages it imports}, from the module graph."""
    out: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for name, deps in graph().items():
        if name in TOP:
            continue
        mine = name.split(".")[1]
        out[mine] |= {d.split(".")[1] for d in deps if d not in TOP and d.split(".")[1] != mine}
    return out


def test_architecture_md_import_table_is_true():
    rows = {}
    for line in (SRC.parent / "ARCHITECTURE.md").read_text().splitlines():
        m = re.fullmatch(r"\| `(\w+)` \| ([^|]*) \|", line.strip())
        if m and m.group(1) in LAYERS:
            rows[m.group(1)] = set(re.findall(r"\b(" + "|".join(LAYERS) + r")\b", m.group(2)))
    assert rows == {k: v for k, v in package_imports().items() if k != "atomic"}
