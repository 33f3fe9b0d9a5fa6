"""The layering rules of docs/DESIGN.md ("Layering rules"), checked on the source (every .py of diffes_pl/):

- nothing outside `diffes_pl/denoisers/` names a denoiser family to branch on it — no string literal
  equal to a family or built-in name, no startswith/endswith test against one — and nothing probes an
  adapter with `hasattr`/`getattr`: families declare what callers need (the adapter's declarations,
  the family record);
- callbacks read the search module's public run context: no `getattr`/`hasattr` on it, none of its
  private attributes; no module writes another object's private attribute;
- data flows one way: importing the search imports no evaluation module;
- the import graph (every import of every module, however lazy) has no cycle; no module of
  `diffes_pl/denoisers/` imports a family module (one that registers a Family); caching/ imports
  nothing of evaluation/;
- callbacks are optional: nothing in diffes_pl/ outside diffes_pl/callbacks/ imports them.

Each failure names file:line."""
import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DENOISERS = ROOT / "diffes_pl" / "denoisers"
CALLBACKS = ROOT / "diffes_pl" / "callbacks"
# the families of docs/DESIGN.md (Vocabulary: family), also those not (yet) registered; the registry adds
# every other one
KNOWN = {"tiny", "tiny-digits", "dit", "sdxl", "flux", "sd3", "pixart"}
ADAPTER = re.compile(r"\w*adapter\w*", re.IGNORECASE)


def family_names() -> set[str]:
    from diffes_pl.denoisers import families

    names = set(KNOWN)
    for family in families().values():
        names.add(family.name)
        names.update(family.hub_names)  # built-in names and hub ids it ships configs for
    return {n.casefold() for n in names}


def sources() -> list[Path]:
    return sorted(p for p in (ROOT / "diffes_pl").rglob("*.py") if DENOISERS not in p.parents)


def where(path: Path, node_or_line) -> str:
    line = node_or_line if isinstance(node_or_line, int) else node_or_line.lineno
    return f"{path.relative_to(ROOT)}:{line}"


def literal(node: ast.AST) -> list[str]:
    """The string constants of an argument (a string or a tuple of strings)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple):
        return [v for elt in node.elts for v in literal(elt)]
    return []


def family_literals(path: Path, source: str, names: set[str]) -> list[str]:
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.STRING:
            continue
        try:
            value = ast.literal_eval(token.string)
        except (ValueError, SyntaxError):  # an f-string: not a name on its own
            continue
        if isinstance(value, str) and value.casefold() in names:
            found.append(f"{where(path, token.start[0])}: family name {value!r}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("startswith", "endswith") and node.args:
            for value in literal(node.args[0]):
                v = value.casefold()
                hit = [n for n in names if (n.startswith(v) if node.func.attr == "startswith" else n.endswith(v))]
                if len(v) >= 2 and hit:
                    found.append(f"{where(path, node)}: {node.func.attr}({value!r}) tests a family name ({hit[0]})")
    return found


def in_callbacks(path: Path) -> bool:
    return CALLBACKS in path.parents


def probes(path: Path, tree: ast.AST) -> list[str]:
    """hasattr/getattr on an adapter anywhere, and on the LightningModule in callbacks."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("hasattr", "getattr") and node.args:
            target = ast.unparse(node.args[0])
            if ADAPTER.search(target) or (in_callbacks(path) and target.split(".")[0] == "pl_module"):
                found.append(f"{where(path, node)}: {node.func.id}({target}, …) probes for a capability")
    return found


def private_access(path: Path, tree: ast.AST) -> list[str]:
    """Callbacks reading the module's private attributes; anyone writing another object's."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        owner = ast.unparse(node.value)
        if in_callbacks(path) and owner.split(".")[0] == "pl_module":
            found.append(f"{where(path, node)}: reads {owner}.{node.attr}")
        elif isinstance(node.ctx, ast.Store) and owner not in ("self", "cls"):
            found.append(f"{where(path, node)}: writes {owner}.{node.attr}")
    return found


def test_checks_catch_what_they_are_for():
    names = family_names()
    bad = ('if adapter.name == "tiny-digits" or name.startswith("sdxl"):\n'
           '    x = getattr(self.adapter, "vae", None) or hasattr(engine.adapter, "x")\n'
           'module._root_dir = "."\n')
    good = ('dtype = getattr(torch, name)\nok = hasattr(torch.ops.aten, "f")\nn = getattr(trainer, "loggers")\n'
            'self._x = 1\nname.startswith("-")\n')
    path = ROOT / "diffes_pl" / "example.py"
    tree = ast.parse(bad)
    found = family_literals(path, bad, names) + probes(path, tree) + private_access(path, tree)
    # "sdxl" twice: a family literal, and a startswith test against one
    assert len(found) == 6 and all(f.startswith("diffes_pl/example.py:") for f in found), found
    tree = ast.parse(good)
    assert family_literals(path, good, names) + probes(path, tree) + private_access(path, tree) == []
    callback = CALLBACKS / "example.py"
    tree = ast.parse('a = getattr(pl_module, "survivors", None)\nb = pl_module._root_dir\n')
    assert len(probes(callback, tree) + private_access(callback, tree)) == 2


def test_no_family_names_or_adapter_probes_outside_denoisers():
    names = family_names()
    found = []
    for path in sources():
        source = path.read_text()
        tree = ast.parse(source)
        found += family_literals(path, source, names) + probes(path, tree) + private_access(path, tree)
    assert not found, "layering broken (ask the adapter's declarations or the run context instead):\n" + "\n".join(found)


def test_importing_the_search_imports_no_evaluation():
    code = ("import sys, diffes_pl.search.lightning_module; "
            "print([m for m in sys.modules if m.startswith('diffes_pl.evaluation.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def imported(path: Path, node: ast.AST) -> list[str]:
    """The absolute module names an import statement of `path` (a diffes_pl module) names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if not node.level:
        return [node.module or ""]
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    base = package[:len(package) - node.level + 1]
    return [".".join([*base, *([node.module] if node.module else [])])]


def test_evaluation_imports_nothing_of_the_search():
    """docs/DESIGN.md, Layering rules: search and evaluation both build on sampling; neither imports the other."""
    found = [f"{where(path, node)}: imports {name}"
             for path in sorted((ROOT / "diffes_pl" / "evaluation").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             for name in imported(path, node) if name.startswith("diffes_pl.search")]
    assert not found, "\n".join(found)


def callback_imports(path: Path, tree: ast.AST) -> list[str]:
    """Imports of diffes_pl.callbacks outside it: `import`, `from … import`, also by string (importlib,
    a class_path default)."""
    if CALLBACKS in path.parents:
        return []

    def is_callbacks(name: str) -> bool:
        return name == "diffes_pl.callbacks" or name.startswith("diffes_pl.callbacks.")

    found = []
    for node in ast.walk(tree):
        names = imported(path, node)
        if isinstance(node, ast.ImportFrom):  # `from diffes_pl import callbacks` names the package in its alias
            names += [f"{names[0]}.{alias.name}" for alias in node.names]
        found += [f"{where(path, node)}: imports {name}" for name in names if is_callbacks(name)][:1]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and is_callbacks(node.value):
            found.append(f"{where(path, node)}: names {node.value!r}")
    return found


def test_nothing_outside_callbacks_imports_them():
    """A run's required outputs (schedule.json, the store) never depend on which callbacks are configured."""
    bad = ("from ..callbacks import SearchPlots\nimport diffes_pl.callbacks.plots\nfrom .. import callbacks\n"
           "from diffes_pl import callbacks\nimportlib.import_module('diffes_pl.callbacks')\n")
    assert len(callback_imports(ROOT / "diffes_pl" / "search" / "example.py", ast.parse(bad))) == 5
    assert callback_imports(CALLBACKS / "example.py", ast.parse("from .plots import SearchPlots\n")) == []
    found = [f for p in sorted((ROOT / "diffes_pl").rglob("*.py")) for f in callback_imports(p, ast.parse(p.read_text()))]
    assert not found, "\n".join(found)


# --- the import graph -------------------------------------------------------------------------------
# Built from the source: every import statement of every module of diffes_pl/ (at module level, inside
# functions, under TYPE_CHECKING), relative imports resolved, `from pkg import name` naming a
# submodule counted as importing that submodule. An edge a → b: a names b in an import.
def package_modules() -> dict[str, Path]:
    """Every module of diffes_pl by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in (ROOT / "diffes_pl").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The modules of `modules` that an import statement of `path` loads: `imported`'s names, a
    `from pkg import name` that names a submodule as that submodule, each cut back to the longest
    prefix that is a module (`import diffes_pl.x.Y` loads diffes_pl.x)."""
    names = imported(path, node)
    if isinstance(node, ast.ImportFrom):
        names = [f"{names[0]}.{a.name}" if f"{names[0]}.{a.name}" in modules else names[0] for a in node.names]
    found = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module → {module it imports: line of the first such import}."""
    graph = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            for target in imported_modules(path, node, modules):
                if target != name:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle [a, b, …, a] for every edge that closes one in a depth-first walk (none: acyclic)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def family_modules(modules: dict[str, Path]) -> dict[str, str]:
    """module → family name, for the modules of diffes_pl/denoisers/ that register a Family
    (`register(Family("name", …))`), checked against the registry: every registered family is found."""
    from diffes_pl.denoisers import families

    found = {}
    for name, path in modules.items():
        if DENOISERS not in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("register") and node.args and \
                    isinstance(node.args[0], ast.Call) and ast.unparse(node.args[0].func).endswith("Family"):
                found[name] = ast.literal_eval(node.args[0].args[0])
    assert sorted(found.values()) == sorted(families()), (found, sorted(families()))
    return found


def test_graph_checks_catch_what_they_are_for():
    pkg = ROOT / "diffes_pl" / "denoisers"
    modules = {m: pkg / "x.py" for m in ("diffes_pl", "diffes_pl.denoisers", "diffes_pl.denoisers.dit",
                                          "diffes_pl.denoisers.base", "diffes_pl.memory", "diffes_pl.sampling")}
    source = ("from .base import X\nfrom . import dit\nfrom .. import memory, __version__\n"
              "def f():\n    import diffes_pl.sampling\n    from ..denoisers.base import Y\n")
    found = [t for node in ast.walk(ast.parse(source)) for t in imported_modules(pkg / "tiny.py", node, modules)]
    assert sorted(found) == ["diffes_pl", "diffes_pl.denoisers.base", "diffes_pl.denoisers.base",
                             "diffes_pl.denoisers.dit", "diffes_pl.memory", "diffes_pl.sampling"]
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({**graph, "c": {"d": 1}}) == []


def show(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    steps = [f"{a} ({where(modules[a], graph[a][b])})" for a, b in zip(cycle, cycle[1:])]
    return " → ".join([*steps, cycle[-1]])


def test_the_import_graph_has_no_cycles():
    """No module imports, however lazily, a module that imports it back: shared pieces live below their users."""
    modules = package_modules()
    graph = import_graph(modules)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(show(c, graph, modules) for c in found)


def test_no_denoiser_module_imports_a_family_module():
    """A family module (one that registers a Family) is imported by the registry alone: what two
    families share lives in a module of denoisers/ named for it, below both."""
    modules = package_modules()
    graph = import_graph(modules)
    families = family_modules(modules)
    found = [f"{where(modules[m], line)}: {m} imports the {families[target]} family's module {target}"
             for m, edges in graph.items() if DENOISERS in modules[m].parents
             for target, line in edges.items() if target in families]
    assert not found, "\n".join(found)


def test_caching_imports_nothing_of_evaluation():
    modules = package_modules()
    graph = import_graph(modules)
    found = [f"{where(modules[m], line)}: {m} imports {target}" for m, edges in graph.items()
             if m.startswith("diffes_pl.caching") for target, line in edges.items()
             if target.startswith("diffes_pl.evaluation")]
    assert not found, "\n".join(found)
