"""The package's layout rules, read from the source: no import cycle between its modules, no private name
imported from another module, no module over 600 lines without a reason in its docstring, and the callback
only wires."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "leak_audit"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` statement of module ``importer`` reads from."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def top_level_imports(name: str) -> set[str]:
    """The package modules ``name`` imports when it is imported: module-level statements only, not those under
    ``if TYPE_CHECKING:`` nor inside functions (both run later or never)."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = resolve(name, node)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in (getattr(node, "body", []), getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    visit(block)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return {m for m in found if m in MODULES and m != name}


def test_the_layout_rules_see_the_whole_package():
    assert len(MODULES) > 80 and "leak_audit.callback" in MODULES and "leak_audit.attacks.text.span_check" in MODULES
    assert "leak_audit.attacks.registry" in top_level_imports("leak_audit.attacks.defaults")


def test_no_import_cycle():
    graph = {name: top_level_imports(name) for name in MODULES}
    # a package imports its own submodules by design (its __init__ re-exports them); a cycle is a module that
    # reaches itself through modules that are not its own package's __init__
    for name in graph:
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {m for m in graph[name] if m not in parents}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)


def test_no_private_name_imported_from_another_module():
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and resolve(name, node).startswith("leak_audit"):
                offenders += [f"{name}: from {resolve(name, node)} import {a.name}"
                              for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, "\n".join(offenders)


def test_long_modules_say_why():
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    unexplained = []
    for name, lines in long.items():
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(MODULES[name].read_text())) or ""
        if "lines" not in doc:  # the reason names the module's length
            unexplained.append(f"{name}: {lines} lines")
    assert not unexplained, "modules over 600 lines without a reason in the docstring:\n" + "\n".join(unexplained)


def test_the_callback_only_wires():
    """``callback.py`` holds hooks, state and wiring: about 400 lines of code besides its argument reference, and
    no attack, model-architecture or metric code of its own (it imports none of those rooms' internals)."""
    source = MODULES["leak_audit.callback"].read_text()
    tree = ast.parse(source)
    docstrings = 0
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings += body[0].end_lineno - body[0].lineno + 1
    code = len(source.splitlines()) - docstrings
    assert code <= 400, f"callback.py has {code} lines besides docstrings"
    imported = top_level_imports("leak_audit.callback")
    assert not {m for m in imported if m.startswith(("leak_audit.attacks.text", "leak_audit.attacks.image",
                                                      "leak_audit.metrics"))}, imported
