"""The package's shape, read from its source with `ast` (nothing is imported):
no import cycle, no stage package importing the applications, every config class named
…Config, no module over 400 lines (but the allowed, LONG_MODULES), no function over 60 lines.

Imports inside functions count (a lazy import still ties the two modules together);
imports under `if TYPE_CHECKING:` do not, as they never run.
"""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "po_cluster"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Modules allowed over MAX_MODULE_LINES because they hold one concept whole (a long module of one
# concept stays whole rather than split by a line cap): every config of the package, together,
# so a reader finds each YAML section's model in one file.
LONG_MODULES: frozenset[str] = frozenset({"po_cluster.config"})
# Functions allowed over MAX_FUNCTION_LINES, as "module:qualified.name". None today: keep it that way.
LONG_FUNCTIONS: frozenset[str] = frozenset()
# The stages of the data flow are libraries the applications (serving, pipelines, cli) are built from;
# a stage that imported serving would pull the HTTP layer (and Ray Serve) into a training run or a batch job.
STAGES = ("data", "model", "train", "cluster", "sweep", "evaluate", "embed", "store", "tracking")
APPLICATIONS = ("serving",)


def module_name(path: Path, root: Path) -> str:
    """`root/a/b.py` -> `<root name>.a.b`; a package's `__init__.py` is the package itself."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_of(root: Path) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of `if TYPE_CHECKING:` (their `else:` runs, so it is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _from_base(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    # `from . import x` in a.b.c (module) is relative to a.b; in package a.b (its __init__), to a.b.
    anchor = importer.split(".") if is_package else importer.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def imports_of(path: Path, importer: str, known: set[str]) -> dict[str, int]:
    """The package modules that `importer` (the module at `path`) imports at run time -> first line."""
    found: dict[str, int] = {}
    is_package = path.name == "__init__.py"
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, importer, is_package)
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import name`, the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target in known and target != importer:
                found[target] = min(found.get(target, node.lineno), node.lineno)
    return found


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module -> line of its first import}, for the package at `root`."""
    modules = modules_of(root)
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def tangles(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components that hold a cycle (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:  # node is the root of a component: pop it
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1 or node in graph.get(node, {}):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per tangle, as [a, b, ..., a]."""
    return [_cycle_in(graph, component) for component in tangles(graph)]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first within the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt in component and nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")  # a bug in find_cycles


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    edges = "".join(f"\n  {a} line {graph[a][b]} imports {b}" for a, b in itertools.pairwise(cycle))
    return " -> ".join(cycle) + ":" + edges


def cycle_report(graph: dict[str, dict[str, int]]) -> str:
    """Each tangle as one of its cycles, import by import, plus the modules it also takes in."""
    problems = []
    for component in tangles(graph):
        cycle = _cycle_in(graph, component)
        problems.append(describe_cycle(graph, cycle))
        if len(component) > len(cycle) - 1:
            problems.append(f"  (and in the same loop: {', '.join(sorted(component - set(cycle)))})")
    return "\n".join(problems)


def layer_violations(graph: dict[str, dict[str, int]], root: str, stages: tuple[str, ...],
                     applications: tuple[str, ...]) -> list[str]:
    """"importer line N imports imported" for each import of an application package by a stage package."""
    def package_of(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else ""

    return [f"{importer} line {line} imports {imported}"
            for importer, imports in sorted(graph.items()) if package_of(importer) in stages
            for imported, line in sorted(imports.items())
            if package_of(imported) in applications and imported.startswith(root + ".")]


def config_classes(root: Path, base: str = "Strict", not_configs: frozenset[str] = frozenset()) -> set[str]:
    """The public classes that derive from `base` (by name, through any chain of the package's classes),
    except those derived through `not_configs` (request models share the base, but are not configs)."""
    bases: dict[str, set[str]] = {}
    for path in modules_of(root).values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                         if isinstance(b, (ast.Name, ast.Attribute))}
                bases.setdefault(node.name, set()).update(names)
    found, grown = {base}, True
    while grown:
        more = {name for name, parents in bases.items() if parents & found and name not in not_configs}
        grown, found = bool(more - found), found | more
    return {name for name in found - {base} if not name.startswith("_")}


def _function_lengths(node: ast.AST, prefix: str = ""):
    """(qualified name, lines with decorators) of every function under `node`, nested ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                yield name, child.end_lineno - first + 1
            yield from _function_lengths(child, name + ".")
        else:
            yield from _function_lengths(child, prefix)


def long_functions(root: Path, limit: int) -> dict[str, int]:
    """"module:qualified.name" -> lines, for every function over `limit` lines."""
    return {f"{module}:{name}": lines
            for module, path in modules_of(root).items()
            for name, lines in _function_lengths(ast.parse(path.read_text(), str(path)))
            if lines > limit}


# ---------------------------------------------------------------- the package


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and graph["po_cluster.cli"], "the import graph looks empty: is PACKAGE right?"
    report = cycle_report(graph)
    assert not report, "import cycles in po_cluster:\n" + report


def test_no_stage_package_imports_serving():
    graph = import_graph(PACKAGE)
    assert all(f"po_cluster.{stage}" in graph for stage in STAGES), "a stage package is missing: is STAGES right?"
    found = layer_violations(graph, "po_cluster", STAGES, APPLICATIONS)
    assert not found, "stage packages import an application:\n  " + "\n  ".join(found)


def test_every_config_class_is_named_config():
    # One suffix for one concept: Settings, Args, Limits, Spec each read as something else.
    found = config_classes(PACKAGE, not_configs=frozenset({"StrictRequest"}))
    assert {"RunConfig", "ServeConfig", "StoreConfig", "ImageLimitsConfig"} <= found, "is config_classes right?"
    assert sorted(name for name in found if not name.endswith("Config")) == []


def test_no_module_is_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules_of(PACKAGE).items()}
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES and name not in LONG_MODULES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: " + ", ".join(
        f"{modules_of(PACKAGE)[name].relative_to(PACKAGE.parent)} ({n})" for name, n in sorted(over.items()))


def test_no_function_over_60_lines_beyond_the_allow_list():
    found = long_functions(PACKAGE, MAX_FUNCTION_LINES)
    added = {name: n for name, n in found.items() if name not in LONG_FUNCTIONS}
    assert not added, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(
        f"{name} ({n})" for name, n in sorted(added.items()))
    stale = LONG_FUNCTIONS - set(found)
    assert not stale, f"no longer over {MAX_FUNCTION_LINES} lines, drop from LONG_FUNCTIONS: {sorted(stale)}"


# ---------------------------------------------------------------- the checks themselves


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def test_graph_counts_lazy_submodule_and_relative_imports_but_not_type_checking(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg.sub import b\n",
        "sub/__init__.py": "from .b import thing\n",
        "sub/b.py": "from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    import pkg.a\n"
                    "else:\n    from .. import c\nthing = 1\n",
        "c.py": "from pkg.sub.b import thing\nimport pkg.sub as s\n",
    })
    assert import_graph(root) == {
        "pkg": {}, "pkg.a": {"pkg.sub.b": 2}, "pkg.sub": {"pkg.sub.b": 1},
        "pkg.sub.b": {"pkg.c": 6}, "pkg.c": {"pkg.sub.b": 1, "pkg.sub": 2},
    }


def test_cycles_are_found_and_named_in_order():
    graph = {"m.a": {"m.b": 3}, "m.b": {"m.c": 5}, "m.c": {"m.a": 7, "m.d": 8}, "m.d": {}, "m.e": {"m.e": 1}}
    cycles = find_cycles(graph)
    assert sorted(cycles) == [["m.a", "m.b", "m.c", "m.a"], ["m.e", "m.e"]]
    assert sorted(map(sorted, tangles(graph))) == [["m.a", "m.b", "m.c"], ["m.e"]]
    assert describe_cycle(graph, ["m.a", "m.b", "m.c", "m.a"]) == (
        "m.a -> m.b -> m.c -> m.a:\n  m.a line 3 imports m.b\n  m.b line 5 imports m.c\n  m.c line 7 imports m.a")
    assert find_cycles({"m.a": {"m.b": 1}, "m.b": {}}) == []
    # a tangle wider than its shortest cycle is reported whole
    wide = {"m.a": {"m.b": 1, "m.c": 1}, "m.b": {"m.a": 2}, "m.c": {"m.b": 3}}
    assert find_cycles(wide) == [["m.a", "m.b", "m.a"]] and tangles(wide) == [{"m.a", "m.b", "m.c"}]
    assert cycle_report(wide).endswith("m.b line 2 imports m.a\n  (and in the same loop: m.c)")
    assert cycle_report({"m.a": {}}) == ""


def test_layer_violations_name_each_stage_import_of_an_application():
    graph = {"m": {}, "m.data.a": {"m.serving.limits": 4, "m.model": 2}, "m.model": {}, "m.serving.limits": {},
             "m.serving.app": {"m.data.a": 1}, "m.cli": {"m.serving.app": 3}, "m.embed": {"m.serving": 7},
             "m.serving": {}}
    assert layer_violations(graph, "m", ("data", "model", "embed"), ("serving",)) == [
        "m.data.a line 4 imports m.serving.limits", "m.embed line 7 imports m.serving"]
    assert layer_violations({"m.data": {"m.model": 1}, "m.model": {}}, "m", ("data",), ("serving",)) == []


def test_config_classes_follow_the_base_through_the_package(tmp_path):
    root = _package(tmp_path, {"__init__.py": "", "c.py": "class Strict: ...\nclass AConfig(Strict): ...\n"
                               "class _Hidden(Strict): ...\nclass Limits(_Hidden): ...\n",
                               "d.py": "from pkg import c\nclass Args(c.AConfig): ...\nclass Request(c.Strict): ...\n"
                                       "class Body(Request): ...\nclass Other: ...\n"})
    assert config_classes(root) == {"AConfig", "Limits", "Args", "Request", "Body"}
    assert config_classes(root, not_configs=frozenset({"Request"})) == {"AConfig", "Limits", "Args"}


def test_long_functions_are_measured_with_their_decorators_and_nesting(tmp_path):
    def body(n: int, indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    root = _package(tmp_path, {"__init__.py": "", "m.py": (
        f"def short():\n{body(59, '    ')}"                                   # 60 lines: allowed
        f"@staticmethod\ndef decorated():\n{body(59, '    ')}"                # 61 with its decorator
        f"class K:\n    def method(self):\n        def inner():\n{body(59, ' ' * 12)}"  # 61 and 60
    )})
    assert long_functions(root, 60) == {"pkg.m:decorated": 61, "pkg.m:K.method": 61}


def test_test_files_have_unique_names():
    # The test folders are not packages, so pytest imports each test file by its bare name: two files
    # of one name anywhere under tests/ (say tests/unit/data and tests/integration/data) would stop
    # the whole run at collection.
    names = [path.name for path in (Path(__file__).resolve().parents[1]).rglob("test_*.py")]
    assert sorted(name for name in set(names) if names.count(name) > 1) == []
