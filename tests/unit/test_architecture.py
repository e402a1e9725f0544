"""The package's shape: no import cycles (a producer never imports its renderer), no private imports in tests."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "tunelab"
TESTS = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """tunelab modules a file imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tunelab"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycles() -> None:
    edges = graph()
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node) :] + [node])
            return
        for nxt in edges.get(node, ()):
            if not nxt.startswith(node + "."):  # a package importing its own submodules is its registry
                visit(nxt, [*stack, node])

    for start in edges:
        visit(start, [])
    assert cycles == []


def test_scope_kinds_do_not_import_the_commands_that_use_them() -> None:
    """Export, compare and train call the scope kinds; a kind calling back into them is a cycle that the check
    above cannot see through the scopes package's own registry."""
    edges = graph()
    kinds = [m for m in edges if m == "tunelab.scopes" or m.startswith("tunelab.scopes.")]
    for kind in kinds:
        assert not edges[kind] & {"tunelab.export", "tunelab.compare", "tunelab.train", "tunelab.study"}, kind


def test_results_do_not_import_their_renderers() -> None:
    edges = graph()
    for producer in ("tunelab.compare", "tunelab.plan", "tunelab.train", "tunelab.runs", "tunelab.methods"):
        assert not any(m.startswith("tunelab.report") for m in edges[producer]), producer


def test_tests_import_no_private_names() -> None:
    private = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunelab"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def test_scope_kinds_are_named_only_where_they_are_declared_and_implemented() -> None:
    """A scope kind's behaviour has one home (tunelab/scopes/<kind>.py): no other module switches on its name,
    so adding a kind is one module plus its registration. config.py declares the tag the experiment file uses."""
    from tunelab.scopes import REGISTRY

    names = set(REGISTRY)
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "scopes" or path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}")
    assert found == []
    assert names == {"lora", "partial", "full"}


def test_the_package_imports_no_private_names_across_modules() -> None:
    """A module's private helpers stay its own: another module that needs one gets a public name instead."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
                found += [f"{path.relative_to(PACKAGE)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


def test_the_manifest_is_read_and_written_in_one_module() -> None:
    """A run's record is one typed model (runs.Manifest): only runs.py touches manifest.json."""
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "runs.py" and ("manifest.json" in path.read_text() or "MANIFEST" in path.read_text())
    ]
    assert offenders == []
