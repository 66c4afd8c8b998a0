"""The node-side packages (training/, convert/, deploy/) run on the nodes with their own environment: they
and every clusterctl module they import, at any depth and also inside functions, never import Click (the
orchestrator's CLI library) and never the orchestrator's CLI modules. A static walk of the import graph."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"clusterctl.training": "training", "clusterctl.convert": "convert", "clusterctl.deploy": "deploy",
            "clusterctl.templates": "templates", "clusterctl": "cluster"}
NODE_SIDE = ("training", "convert", "deploy")


def source_of(module: str) -> Path | None:
    """The file of a clusterctl module (None for third-party modules and names that are not modules)."""
    for prefix, folder in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            base = ROOT / folder / Path(*module[len(prefix):].lstrip(".").split(".") if module != prefix else ())
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def module_of(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    package = next(name for name, f in PACKAGES.items() if f == folder)
    rest = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
    return ".".join([package, *rest])


def imported(path: Path) -> set[str]:
    """Every module `path` imports (relative imports resolved; `from X import name` also tries X.name)."""
    here = module_of(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_node_side_code_never_imports_click():
    start = [p for folder in NODE_SIDE for p in sorted((ROOT / folder).rglob("*.py"))]
    seen, queue, offenders = set(start), list(start), []
    while queue:
        path = queue.pop()
        for module in imported(path):
            if module.split(".")[0] == "click" or module in ("clusterctl.cli", "clusterctl.commands"):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
            source = source_of(module)
            if source and source not in seen:
                seen.add(source)
                queue.append(source)
    assert not offenders, "\n".join(sorted(offenders))
    assert len(seen) > len(start)          # the walk really followed clusterctl.errors and friends


def cycle_in(folder: str) -> list[str]:
    """One import cycle among a package's modules (lazy imports included), or []."""
    files = {module_of(p): p for p in sorted((ROOT / folder).rglob("*.py"))}
    edges = {name: sorted(m for m in imported(path) if m in files and m != name) for name, path in files.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> list[str]:
        state[name] = "open"
        for nxt in edges[name]:
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt] if nxt in trail else [name, nxt]
            if nxt not in state and (found := visit(nxt, [*trail, nxt])):
                return found
        state[name] = "done"
        return []

    for name in files:
        if name not in state and (found := visit(name, [name])):
            return found
    return []


def test_the_converter_has_no_import_cycle():
    """core writes what verify checks; both read tensors through convert.tensors, neither imports the other."""
    assert cycle_in("convert") == []
