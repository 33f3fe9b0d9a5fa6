"""The layering rules of DESIGN.md, checked on the source (every .py of diffes_pl/ and callbacks/):

- nothing outside `diffes_pl/denoisers/` names a denoiser family to branch on it — no string literal
  equal to a family or built-in name, no startswith/endswith test against one — and nothing probes an
  adapter with `hasattr`/`getattr`: families declare what callers need (the adapter's declarations,
  the family record);
- callbacks read the search module's public run context: no `getattr`/`hasattr` on it, none of its
  private attributes; no module writes another object's private attribute;
- data flows one way: importing the search imports no evaluation module but MAC counting.

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
# the families of DESIGN.md, also those not (yet) registered; the registry adds every other one
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
    files = [*(ROOT / "diffes_pl").rglob("*.py"), *(ROOT / "callbacks").rglob("*.py")]
    return sorted(p for p in files if DENOISERS not in p.parents)


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
    return (ROOT / "callbacks") in path.parents


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
    callback = ROOT / "callbacks" / "example.py"
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


def test_importing_the_search_imports_no_evaluation_but_macs():
    code = ("import sys, diffes_pl.search.module; "
            "print([m for m in sys.modules if m.startswith('diffes_pl.evaluation.') and m != 'diffes_pl.evaluation.macs'])")
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
    """DESIGN: search and evaluation both build on sampling; neither imports the other."""
    found = [f"{where(path, node)}: imports {name}"
             for path in sorted((ROOT / "diffes_pl" / "evaluation").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             for name in imported(path, node) if name.startswith("diffes_pl.search")]
    assert not found, "\n".join(found)
