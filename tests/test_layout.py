"""The package's layout rules (docs/architecture.md), read from the source with `ast`, nothing imported:

(a) no import cycle between the modules of `opd_megatron/`;
(b) `opd_megatron/math/` imports nothing of the package outside `math/` (the references stand alone);
(c) each vocabulary-parallel twin `parallel/X.py` has its reference `math/X.py` and one test file
    `tests/parallel/test_X.py` that imports both;
(d) the loops (`opd_megatron/loop/`) do not ask their parts what they are: no `hasattr`, no `getattr` with a
    literal attribute name, no private attribute of another object (`obj._name` with `obj` not `self` / `cls`);
(e) the parts (`cli`, `config/`, `loop/`, ...: the first name under `opd_megatron/`) import each other in one
    direction, and `docs/architecture.md` lists exactly those arrows.

Every import statement counts, wherever it stands: module level, inside a function (a deferred import is still
a dependency), under `if TYPE_CHECKING:` (an arrow a reader follows). An import resolves to the most specific
module that exists: `from opd_megatron.math import credit` is `opd_megatron.math.credit`,
`from opd_megatron.loop.sft import RunContext` is `opd_megatron.loop.sft`, a name defined in a package's
`__init__.py` is that package.

Each rule is a function returning its violations; the tests at the bottom run each one on a small synthetic
package with a planted violation, so a rule that silently stopped seeing anything would fail there.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = "opd_megatron"

# The single-device references in math/X.py whose vocabulary-parallel twin is parallel/X.py. The other modules of
# parallel/ (shard.py, topk.py, fused.py, finite.py) are infrastructure with no reference of their own name; a
# parallel module that shares a name with a math module must be listed here.
TWINS = ("divergences", "supports", "cr_opd", "diagnostics")
SELF_NAMES = ("self", "cls")


@dataclass(frozen=True)
class Import:
    """One import statement of `source` that reaches module `target` of the package, at `path:line`."""

    source: str
    target: str
    path: Path
    line: int

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` under `root/package` (a package is its `__init__.py`)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _most_specific(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_in(path: Path, module: str | None, modules: dict[str, Path], package: str = PACKAGE) -> list[Import]:
    """The package modules that the file at `path` imports, anywhere in it. `module` is its dotted name (needed
    for relative imports; None for a file outside the package, such as a test)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    continue
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                imported = ".".join(base + ([node.module] if node.module else []))
            else:
                imported = node.module or ""
            # `from a.b import c`: the submodule a.b.c when it exists, else a name defined in a.b.
            targets = [f"{imported}.{alias.name}" if f"{imported}.{alias.name}" in modules else imported
                       for alias in node.names]
        else:
            continue
        for name in targets:
            if name != package and not name.startswith(package + "."):
                continue
            target = _most_specific(name, modules)
            if target is not None and target != module:
                found.append(Import(module or str(path), target, path, node.lineno))
    return found


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, list[Import]]:
    """Module -> its imports of other package modules."""
    modules = package_modules(root, package)
    return {name: imports_in(path, name, modules, package) for name, path in modules.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle `[a, b, ..., a]` through each strongly connected component of more than one node
    (Tarjan's algorithm, then a breadth-first search inside the component from its first node by name).
    `edges` maps a node to the nodes it points to; nodes that only appear as targets are allowed."""
    nodes = sorted(set(edges) | {t for targets in edges.values() for t in targets})
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                lowlink[node] = min(lowlink[node], lowlink[target])
            elif target in on_stack:
                lowlink[node] = min(lowlink[node], index[target])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in nodes:
        if node not in index:
            connect(node)

    cycles = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        parent: dict[str, str] = {}
        frontier = [start]
        closing = None
        while frontier and closing is None:
            following = []
            for node in frontier:
                for target in sorted(edges.get(node, ())):
                    if target == start:
                        closing = node
                        break
                    if target in members and target not in parent:
                        parent[target] = node
                        following.append(target)
                if closing is not None:
                    break
            frontier = following
        path = [closing]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append(path[::-1] + [start])
    return cycles


def import_cycles(root: Path, package: str = PACKAGE) -> list[str]:
    """Rule (a): each import cycle of the package, written `a -> b (file:line) -> ... -> a (file:line)`."""
    graph = import_graph(root, package)
    edges = {source: {imp.target for imp in imports} for source, imports in graph.items()}
    described = []
    for cycle in find_cycles(edges):
        steps = [cycle[0]]
        for source, target in zip(cycle, cycle[1:]):
            first = min((imp for imp in graph[source] if imp.target == target), key=lambda imp: imp.line)
            steps.append(f"{target} ({first.where(root)})")
        described.append(" -> ".join(steps))
    return described


def math_imports_outside_math(root: Path, package: str = PACKAGE) -> list[str]:
    """Rule (b): imports from `package.math` (and its submodules) of package modules outside `math/`."""
    math = f"{package}.math"
    return [f"{imp.where(root)}: {imp.source} imports {imp.target}"
            for source, imports in import_graph(root, package).items()
            if source == math or source.startswith(math + ".")
            for imp in imports if imp.target != math and not imp.target.startswith(math + ".")]


def twin_violations(root: Path, twins: tuple[str, ...] = TWINS, package: str = PACKAGE) -> list[str]:
    """Rule (c): each twin has `math/X.py`, `parallel/X.py` and `tests/parallel/test_X.py` importing both; a
    parallel module named like a math module is a listed twin."""
    modules = package_modules(root, package)
    reference, parallel = f"{package}.math", f"{package}.parallel"
    problems = []
    for name in sorted(set(twins)):
        for side in (reference, parallel):
            if f"{side}.{name}" not in modules:
                problems.append(f"{name}: {side.replace('.', '/')}/{name}.py is missing")
        test = root / "tests" / "parallel" / f"test_{name}.py"
        if not test.is_file():
            problems.append(f"{name}: {test.relative_to(root)} is missing (the test that holds "
                            f"{parallel}.{name} equal to {reference}.{name})")
            continue
        imported = {imp.target for imp in imports_in(test, None, modules, package)}
        for side in (reference, parallel):
            if f"{side}.{name}" not in imported:
                problems.append(f"{name}: {test.relative_to(root)} does not import {side}.{name}")
    for module in sorted(modules):
        if module.startswith(parallel + "."):
            name = module.rpartition(".")[2]
            if f"{reference}.{name}" in modules and name not in twins:
                problems.append(f"{name}: {package}/parallel/{name}.py shares its name with math/{name}.py but is not "
                                f"in TWINS (tests/test_layout.py): a twin, or rename it")
    return problems


def duck_typing_in(path: Path, root: Path) -> list[str]:
    """Rule (d) for one file: `hasattr(...)`, `getattr(obj, "literal", ...)`, and `obj._name` with `obj` not
    `self` / `cls` / `super()` (dunder names such as `__class__` are not private)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(root)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "hasattr":
                found.append((node.lineno, ast.unparse(node)))
            elif node.func.id == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in SELF_NAMES:
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            found.append((node.lineno, ast.unparse(node)))
    return [f"{where}:{line}: {code}" for line, code in sorted(found)]


def loop_duck_typing(root: Path, package: str = PACKAGE, *, kinds: tuple[str, ...] = ("hasattr", "getattr",
                                                                                         "private")) -> list[str]:
    """Rule (d) over `package/loop/`, restricted to `kinds`."""
    found = []
    for path in sorted((root / package / "loop").rglob("*.py")):
        for entry in duck_typing_in(path, root):
            code = entry.split(": ", 1)[1]
            kind = "hasattr" if code.startswith("hasattr(") else "getattr" if code.startswith("getattr(") \
                else "private"
            if kind in kinds:
                found.append(entry)
    return found


def part_of(module: str, package: str = PACKAGE) -> str | None:
    """The part a module belongs to: the first name under the package (`opd_megatron.loop.opd` -> `loop`,
    `opd_megatron.cli` -> `cli`); None for the package's own `__init__.py`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == package else None


def part_arrows(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Part -> the other parts it imports (every part appears, with an empty set if it imports none)."""
    arrows: dict[str, set[str]] = {}
    for source, imports in import_graph(root, package).items():
        part = part_of(source, package)
        if part is None:
            continue
        arrows.setdefault(part, set())
        for imp in imports:
            target = part_of(imp.target, package)
            if target is not None and target != part:
                arrows[part].add(target)
    return arrows


def documented_arrows(doc: Path, heading: str = "## One-way arrows") -> dict[str, set[str]]:
    """The arrows listed in the first code block after `heading` of `doc`, one `part -> a, b, c` line each; a part
    that imports nothing of the package is not listed."""
    lines = doc.read_text().splitlines()
    start = lines.index(heading)
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    arrows = {}
    for line in lines[fence + 1:]:
        if line.startswith("```"):
            break
        source, _, targets = line.partition("->")
        arrows[source.strip()] = {t.strip() for t in targets.split(",") if t.strip()}
    return arrows


def arrow_lines(arrows: dict[str, set[str]]) -> list[str]:
    width = max((len(part) for part in arrows), default=0) + 1
    return [f"{part:{width}s}-> {', '.join(sorted(targets))}" for part, targets in sorted(arrows.items()) if targets]


# --- the rules on the repository ----------------------------------------------------------------------------------

def test_the_package_has_no_import_cycle():
    cycles = import_cycles(REPOSITORY)
    assert not cycles, "import cycles (module -> imported module (where)):\n  " + "\n  ".join(cycles)


def test_math_imports_nothing_of_the_package_outside_math():
    found = math_imports_outside_math(REPOSITORY)
    assert not found, "opd_megatron/math/ must stand alone:\n  " + "\n  ".join(found)


def test_every_parallel_twin_has_its_reference_and_one_test_holding_them_equal():
    problems = twin_violations(REPOSITORY)
    assert not problems, "\n  ".join(["twins:"] + problems)


def test_the_loop_does_not_use_hasattr_or_private_attributes_of_its_parts():
    found = loop_duck_typing(REPOSITORY, kinds=("hasattr", "private"))
    assert not found, ("the loop asks its parts what they are; give the part's interface a method instead:\n  "
                       + "\n  ".join(found))


def test_the_loop_does_not_read_attributes_by_literal_name_with_getattr():
    found = loop_duck_typing(REPOSITORY, kinds=("getattr",))
    assert not found, ("getattr(obj, 'name', default) is hasattr in disguise; use the part's interface:\n  "
                       + "\n  ".join(found))


def test_the_parts_import_each_other_in_one_direction():
    cycles = find_cycles(part_arrows(REPOSITORY))
    assert not cycles, "two-way arrows between parts:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_the_architecture_doc_lists_the_real_arrows():
    real = {part: targets for part, targets in part_arrows(REPOSITORY).items() if targets}
    documented = documented_arrows(REPOSITORY / "docs" / "architecture.md")
    assert documented == real, "docs/architecture.md, 'One-way arrows', should read:\n" + "\n".join(arrow_lines(real))


# --- each rule sees a planted violation -----------------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_find_cycles_on_synthetic_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    # two components; the shortest cycle through the first member of each
    two = {"a": {"b", "x"}, "b": {"a"}, "x": {"y"}, "y": {"x"}, "p": {"q"}, "q": {"r", "p"}, "r": {"p"}}
    assert find_cycles(two) == [["a", "b", "a"], ["p", "q", "p"], ["x", "y", "x"]]
    # a long cycle with a chord: the shortest way back is taken
    chord = {"a": {"b"}, "b": {"c"}, "c": {"d", "a"}, "d": {"a"}}
    assert find_cycles(chord) == [["a", "b", "c", "a"]]


def test_rules_catch_planted_violations(tmp_path):
    root = _write(tmp_path, {
        "opd_megatron/__init__.py": "",
        "opd_megatron/config.py": "def load():\n    from opd_megatron.teachers.http import Schema\n",
        "opd_megatron/teachers/__init__.py": "",
        "opd_megatron/teachers/http.py": "from opd_megatron import config\n",
        "opd_megatron/math/__init__.py": "",
        "opd_megatron/math/credit.py": "from . import supports\n",
        "opd_megatron/math/supports.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                         "    from ..loop.opd import OpdRun\n",
        "opd_megatron/math/cr_opd.py": "",
        "opd_megatron/math/gates.py": "",
        "opd_megatron/parallel/__init__.py": "",
        "opd_megatron/parallel/cr_opd.py": "from opd_megatron.math.cr_opd import cr_opd_loss\n",
        "opd_megatron/parallel/gates.py": "",
        "opd_megatron/parallel/topk.py": "",
        "opd_megatron/loop/__init__.py": "",
        "opd_megatron/loop/opd.py": ("class OpdRun:\n"
                                    "    def step(self):\n"
                                    "        self._private = 1\n"
                                    "        super()._setup()\n"
                                    "        if hasattr(self.teacher, 'update_ema'):\n"
                                    "            self.teacher.update_ema()\n"
                                    "        mode = getattr(self.teacher, 'mode', None)\n"
                                    "        fields = [getattr(self.stats, name) for name in ('a', 'b')]\n"
                                    "        return self.source._prompt(3), self.teacher.__class__\n"),
        "tests/parallel/test_cr_opd.py": "from opd_megatron.parallel.cr_opd import vocab_parallel_cr_opd_loss\n",
    })
    # (a) a cycle through a function-level import, named with its files and lines
    assert import_cycles(root) == ["opd_megatron.config -> opd_megatron.teachers.http (opd_megatron/config.py:2) "
                                   "-> opd_megatron.config (opd_megatron/teachers/http.py:1)"]
    # (b) a relative import under TYPE_CHECKING that leaves math/; the one inside math/ is fine
    assert math_imports_outside_math(root) == [
        "opd_megatron/math/supports.py:3: opd_megatron.math.supports imports opd_megatron.loop.opd"]
    # (c) a missing reference, a missing test, a test that imports one side, an unlisted same-named module
    assert twin_violations(root, twins=("cr_opd", "topk")) == [
        "cr_opd: tests/parallel/test_cr_opd.py does not import opd_megatron.math.cr_opd",
        "topk: opd_megatron/math/topk.py is missing",
        "topk: tests/parallel/test_topk.py is missing (the test that holds opd_megatron.parallel.topk equal to "
        "opd_megatron.math.topk)",
        "gates: opd_megatron/parallel/gates.py shares its name with math/gates.py but is not in TWINS "
        "(tests/test_layout.py): a twin, or rename it"]
    # (d) hasattr, a literal getattr and another object's private attribute; self._x, super()._x, a getattr by
    # variable name and dunders pass
    assert loop_duck_typing(root) == ["opd_megatron/loop/opd.py:5: hasattr(self.teacher, 'update_ema')",
                                      "opd_megatron/loop/opd.py:7: getattr(self.teacher, 'mode', None)",
                                      "opd_megatron/loop/opd.py:9: self.source._prompt"]
    assert loop_duck_typing(root, kinds=("private",)) == ["opd_megatron/loop/opd.py:9: self.source._prompt"]
    # (e) parts: config <-> teachers is a two-way arrow; math -> loop is listed
    arrows = part_arrows(root)
    assert arrows == {"config": {"teachers"}, "teachers": {"config"}, "math": {"loop"}, "parallel": {"math"},
                      "loop": set()}
    assert find_cycles(arrows) == [["config", "teachers", "config"]]
    doc = root / "architecture.md"
    listed = "\n".join(arrow_lines(arrows))
    doc.write_text(f"# x\n\n## One-way arrows\n\ntext\n\n```\n{listed}\n```\n\n```\nlater -> never read\n```\n")
    assert documented_arrows(doc) == {part: targets for part, targets in arrows.items() if targets}


@pytest.mark.parametrize("statement, target", [
    ("import opd_megatron.math.credit as credit", "opd_megatron.math.credit"),
    ("from opd_megatron.math import credit", "opd_megatron.math.credit"),
    ("from opd_megatron.math.credit import advantages", "opd_megatron.math.credit"),
    ("from opd_megatron.math import ESTIMATORS", "opd_megatron.math"),
    ("from ..math.credit import advantages", "opd_megatron.math.credit"),
    ("from .. import math", "opd_megatron.math"),
    ("from . import sft", "opd_megatron.loop.sft"),
])
def test_imports_resolve_to_the_most_specific_module(tmp_path, statement, target):
    root = _write(tmp_path, {"opd_megatron/__init__.py": "", "opd_megatron/math/__init__.py": "",
                             "opd_megatron/math/credit.py": "", "opd_megatron/loop/__init__.py": "",
                             "opd_megatron/loop/sft.py": "",
                             "opd_megatron/loop/opd.py": f"def later():\n    {statement}\n"})
    modules = package_modules(root)
    found = imports_in(root / "opd_megatron/loop/opd.py", "opd_megatron.loop.opd", modules)
    assert [(imp.target, imp.line) for imp in found] == [(target, 2)]
