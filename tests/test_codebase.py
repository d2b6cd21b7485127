"""The library's shape, read from its AST: imports only go down (no cycle between modules) and no module reaches
into another's private names (what a sibling needs is public API)."""
import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "mlops_nb"
PACKAGE = LIB.name

# Private names still imported across modules, each a pair (importer, exporter) -> why it is not fixed here.
# Remove a pair when its change lands; the test then holds it.
KNOWN_PRIVATE = {
}
# Imports that close a cycle, (importer, exporter) -> why it stays for now. Remove a pair when its change lands.
KNOWN_BACK_EDGES = {
}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(LIB.glob("*.py")) if p.stem not in ("__init__", "_modidx")}


def imported_module(node: ast.ImportFrom) -> str | None:
    "The library module `node` imports from (`from .x import`, `from mlops_nb.x import`), else None."
    if node.level == 1 and node.module: return node.module.split(".")[0]
    if node.level == 0 and node.module and node.module.startswith(PACKAGE + "."): return node.module.split(".")[1]
    return None


def is_type_checking(node: ast.If) -> bool:
    t = node.test
    return isinstance(t, ast.Name) and t.id == "TYPE_CHECKING" or isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"


def all_imports(tree: ast.Module) -> set[str]:
    "Library modules `tree` imports anywhere: at module level or inside a function (a lazy import is a dependency too)."
    return {m for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and (m := imported_module(node))} | {
        a.name.split(".")[1] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names if a.name.startswith(PACKAGE + ".")}


def module_level_imports(tree: ast.Module) -> set[str]:
    """Library modules imported when `tree` is imported: its top-level statements, also inside top-level `try`/`if`
    (but not `if TYPE_CHECKING:`, which never runs). An import inside a function runs at call time, when both modules
    are loaded, so it cannot make an import fail; it is how the CLI and the service stay fast to start."""
    found, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom) and (m := imported_module(node)): found.add(m)
        elif isinstance(node, ast.Import): found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE + ".")}
        elif isinstance(node, ast.If) and not is_type_checking(node): todo += node.body + node.orelse
        elif isinstance(node, ast.Try): todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "One cycle of `graph` as [a, b, ..., a], or None."
    state: dict[str, int] = {}
    def visit(n, path):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1: return path[path.index(m):] + [m]
            if m not in state and (c := visit(m, path + [m])): return c
        state[n] = 2
    for n in sorted(graph):
        if n not in state and (c := visit(n, [n])): return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_library_modules():
    "Imports only go down. At module level a cycle breaks `import`; a lazy (function-level) import that closes a cycle"
    "only hides it, so both count: the graph has an edge for every import, wherever it is written."
    mods = modules()
    top = {name: module_level_imports(tree) - {name} for name, tree in mods.items()}
    assert top["cli"] and top["serve"], "the graph is read (cli and serve import library modules)"
    assert find_cycle(top) is None, f"import cycle at module level: {' -> '.join(find_cycle(top))}"
    graph = {name: {m for m in all_imports(tree) - {name} if (name, m) not in KNOWN_BACK_EDGES} for name, tree in mods.items()}
    assert find_cycle(graph) is None, f"import cycle through a function-level import: {' -> '.join(find_cycle(graph))}"


def test_a_lazy_import_closing_a_cycle_is_found():
    tree = {"serve": ast.parse("from .protocols import add_routes\n"),
            "protocols": ast.parse("def f():\n    from mlops_nb.serve import answer\n")}
    assert find_cycle({n: all_imports(t) for n, t in tree.items()}) in (["protocols", "serve", "protocols"], ["serve", "protocols", "serve"])
    assert find_cycle({n: module_level_imports(t) for n, t in tree.items()}) is None


def private_imports(mods: dict[str, ast.Module]) -> list[tuple[str, str, str]]:
    "(importer, exporter, name) of every `from <library module> import _name` in another library module, at any depth."
    out = []
    for name, tree in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (m := imported_module(node)) and m != name:
                out += [(name, m, a.name) for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def test_private_imports_are_found():
    tree = ast.parse("from .schema import _rows, Schema\ndef f():\n    from mlops_nb.drift import _map\n")
    assert private_imports({"x": tree}) == [("x", "schema", "_rows"), ("x", "drift", "_map")]


def test_no_private_name_imported_across_library_modules():
    crossing = [f"{imp} imports {name} from {exp}" for imp, exp, name in private_imports(modules()) if (imp, exp) not in KNOWN_PRIVATE]
    assert not crossing, "make these public (or keep them in one module):\n" + "\n".join(crossing)


MAX_LINE = 160
# Modules whose notebooks other branches are editing now, so their long lines are wrapped there; remove each once merged.
LONG_LINES_ALLOWED: set[str] = set()   # modules whose long lines are not wrapped yet: none


def long_lines(source: str, limit: int = MAX_LINE) -> list[int]:
    """Numbers of the lines of `source` longer than `limit`, except its module docstring: nbdev writes that from the notebook's
    `> summary`, which stays one line because the docs site takes the page's description from that line alone."""
    body = ast.parse(source).body
    first = body[0] if body else None
    doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    skip = range(first.lineno, first.end_lineno + 1) if doc else range(0)
    return [i for i, line in enumerate(source.splitlines(), 1) if len(line) > limit and i not in skip]


def test_long_lines_are_found():
    long = "x" * (MAX_LINE + 1)
    assert long_lines(f'"""{long}"""\nshort = 1\ns = "{long}"\n') == [3]
    assert long_lines(f"import os\n'{long}'\n") == [2], "a string after code is no docstring"
    assert long_lines(f"# {long}\nx = 1\n") == [1]
    assert long_lines(f"x = '{long[:MAX_LINE - 6]}'\n") == [], "exactly the limit is fine"


def test_no_line_over_160_characters():
    "Wrap a long line inside its brackets, or split a long string into adjacent literals that read the same."
    found = {p.stem: long_lines(p.read_text()) for p in sorted(LIB.glob("*.py")) if p.stem != "_modidx"}  # nbdev's index of names
    assert "cli" in found, "the library is read"
    over = [f"{name}.py:{i}" for name, lines in found.items() if name not in LONG_LINES_ALLOWED for i in lines]
    assert not over, f"lines over {MAX_LINE} characters (mlops_nb is generated: wrap them in the notebook):\n" + "\n".join(over)
