"""docs/reliability.md held to the code, so that it cannot drift: its fault table has at least 30 rows of five columns
(fault, what the user sees, kept, surfaces after, tests); every row names its tests as pytest node ids
(`tests/x/test_y.py::test_name` or `...::TestClass::test_name`, a parametrised test without its `[...]` part), and
every named file and function exists; every exception class the CLI reports as one line (each class of
`cli.py::EXPECTED_ERRORS`, every subclass of one defined in the package, every class of `errors.py`) is named in
some row. Static: the files are parsed with `ast`, nothing is imported or run."""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "docs" / "reliability.md"
PACKAGE = REPO / "opd_megatron"
COLUMNS = ("fault", "what the user sees", "kept", "surfaces after", "tests")
MIN_ROWS = 30
NODE_ID = re.compile(r"tests/[\w/]+\.py::\w+(::\w+)?")


@dataclass(frozen=True)
class Row:
    line: int              # 1-based line of the row in the document
    cells: tuple[str, ...]

    @property
    def tests(self) -> list[str]:
        """The backquoted spans of the tests column."""
        return re.findall(r"`([^`]*)`", self.cells[-1])

    def __str__(self) -> str:
        return f"docs/reliability.md line {self.line} ({self.cells[0][:60]!r})"


def _cells(line: str) -> tuple[str, ...]:
    """The cells of a Markdown table line; `\\|` inside a cell is a literal bar, not a border."""
    return tuple(cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1])


def parse_table(text: str) -> tuple[list[Row], list[str]]:
    """The fault rows of every table in `text` and the problems of its shape (a header other than COLUMNS, a row of
    another width)."""
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        if all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            continue                                   # the header's separator
        if cells and cells[0] == COLUMNS[0]:
            if cells != COLUMNS:
                problems.append(f"docs/reliability.md line {number}: header {cells}, expected {COLUMNS}")
            continue
        if len(cells) != len(COLUMNS):
            problems.append(f"docs/reliability.md line {number}: {len(cells)} cells, expected {len(COLUMNS)} "
                            f"({', '.join(COLUMNS)}); a bar inside a cell is written \\|")
            continue
        rows.append(Row(number, cells))
    return rows, problems


def defined_tests(path: Path) -> set[str]:
    """`name` for every function at module level of the file, `Class::name` for every method of a class there."""
    names = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return names


def missing_tests(rows: list[Row], repo: Path) -> list[str]:
    """Rows without a test, spans of the tests column that are not node ids, files or functions that do not exist."""
    problems, parsed = [], {}
    for row in rows:
        if not row.tests:
            problems.append(f"{row}: no test named in the tests column")
        for node_id in row.tests:
            if not NODE_ID.fullmatch(node_id):
                problems.append(f"{row}: {node_id!r} is not a pytest node id tests/....py::test_name (a parametrised "
                                f"test without its [...] part)")
                continue
            file, name = node_id.split("::", 1)
            path = repo / file
            if not path.is_file():
                problems.append(f"{row}: {file} does not exist")
                continue
            if file not in parsed:
                parsed[file] = defined_tests(path)
            if name not in parsed[file]:
                problems.append(f"{row}: {file} defines no {name}")
    return problems


def _base_names(node: ast.ClassDef) -> set[str]:
    return {base.id if isinstance(base, ast.Name) else base.attr for base in node.bases
            if isinstance(base, (ast.Name, ast.Attribute))}


@functools.lru_cache(maxsize=None)
def _classes_of(source: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, base names) of every class in a module's source (cached by source: parsing is most of the time)."""
    return tuple((node.name, tuple(sorted(_base_names(node)))) for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ClassDef))


def reported_errors(package: Path) -> dict[str, str]:
    """Every exception class the CLI reports as one line, `{name: where it is defined}`: the classes of
    `cli.py::EXPECTED_ERRORS`, every class of the package that derives from one of them (followed through the
    package's own classes, by name), and every exception class of `errors.py`."""
    cli = ast.parse((package / "cli.py").read_text())
    expected = next((node.value for node in ast.walk(cli) if isinstance(node, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "EXPECTED_ERRORS" for t in node.targets)), None)
    assert isinstance(expected, ast.Tuple), "opd_megatron/cli.py: no EXPECTED_ERRORS = (...) tuple found"
    found = {element.id: "cli.py::EXPECTED_ERRORS" for element in expected.elts if isinstance(element, ast.Name)}
    classes: dict[str, tuple[set[str], str]] = {}
    for path in sorted(package.rglob("*.py")):
        where = str(path.relative_to(package.parent))
        for name, bases in _classes_of(path.read_text()):
            classes[name] = (set(bases), where)
    exception_bases = {"Exception", "BaseException", "RuntimeError", "ValueError", "OSError"}
    for name, (bases, where) in classes.items():
        if where.endswith("opd_megatron/errors.py") and bases & (exception_bases | set(classes)):
            found.setdefault(name, where)
    grew = True
    while grew:                                   # subclasses of subclasses, in any order of definition
        grew = False
        for name, (bases, where) in classes.items():
            if name not in found and bases & set(found):
                found[name] = where
                grew = True
    return found


def unnamed_errors(rows: list[Row], errors: dict[str, str]) -> list[str]:
    text = "\n".join(" | ".join(row.cells) for row in rows)
    return [f"{name} ({where}) is named in no row of docs/reliability.md: add the fault that raises it, the message "
            f"the user sees and its test" for name, where in sorted(errors.items())
            if not re.search(rf"\b{re.escape(name)}\b", text)]


# -- the document as it is --------------------------------------------------------------------------------------

def test_the_table_has_thirty_rows_of_five_columns():
    rows, problems = parse_table(TABLE.read_text())
    assert problems == [], "\n".join(problems)
    assert len(rows) >= MIN_ROWS, f"docs/reliability.md has {len(rows)} fault rows, expected at least {MIN_ROWS}"


def test_every_row_names_tests_that_exist():
    rows, _ = parse_table(TABLE.read_text())
    problems = missing_tests(rows, REPO)
    assert problems == [], "\n".join(problems)


def test_every_reported_error_class_is_named_in_a_row():
    rows, _ = parse_table(TABLE.read_text())
    errors = reported_errors(PACKAGE)
    # The classes the CLI lists and the package's own families: a walk that found none of them is broken.
    assert {"ConfigError", "ReportedError", "TeacherError", "CheckpointError", "RolloutServerError", "DataError",
            "NonFiniteLossError"} <= set(errors), sorted(errors)
    problems = unnamed_errors(rows, errors)
    assert problems == [], "\n".join(problems)


# -- the checks themselves catch drift ----------------------------------------------------------------------------

def test_a_deleted_test_a_missing_file_and_a_row_without_tests_are_caught():
    text = TABLE.read_text()
    rows, _ = parse_table(text)
    first = rows[0]
    file, name = first.tests[0].split("::", 1)
    renamed = text.replace(f"{file}::{name}`", f"{file}::{name}_gone`", 1)
    assert any(f"defines no {name}_gone" in p for p in missing_tests(parse_table(renamed)[0], REPO))
    moved = text.replace(f"`{file}::", "`tests/no_such_file.py::", 1)
    assert any("tests/no_such_file.py does not exist" in p for p in missing_tests(parse_table(moved)[0], REPO))
    bracketed = text.replace(f"{file}::{name}`", f"{file}::{name}[case]`", 1)
    assert any("is not a pytest node id" in p for p in missing_tests(parse_table(bracketed)[0], REPO))
    untested = Row(1, ("a fault", "a message", "", "at start", "none yet"))
    assert missing_tests([untested], REPO) == [f"{untested}: no test named in the tests column"]
    assert parse_table("| fault | message | tests |\n|---|---|---|\n")[1]       # the old three-column header
    assert parse_table("| a | b | c | d | e | f |\n")[1]                      # a stray bar in a cell


def test_a_new_error_class_without_a_row_is_caught(tmp_path):
    package = tmp_path / "opd_megatron"
    for path in PACKAGE.rglob("*.py"):
        target = package / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (package / "teachers" / "new_kind.py").write_text(
        "from opd_megatron.teachers.base import TeacherError\n\n\nclass BrandNewTeacherError(TeacherError):\n"
        "    pass\n\n\nclass DeeperError(BrandNewTeacherError):\n    pass\n")
    (package / "data" / "new_format.py").write_text("class NewFormatError(ValueError):\n    pass\n")
    rows, _ = parse_table(TABLE.read_text())
    before = set(unnamed_errors(rows, reported_errors(PACKAGE)))
    problems = [p for p in unnamed_errors(rows, reported_errors(package)) if p not in before]
    assert [p.split(" ", 1)[0] for p in problems] == ["BrandNewTeacherError", "DeeperError", "NewFormatError"], \
        problems
