"""The source of the pinned SGLang, read from its wheel, for the tests that hold our SGLang protocol against it
(tests/teachers/test_sglang_protocol.py for the teacher, tests/rollout/test_sglang_rollout_protocol.py for the
rollout engine and its weight syncs).

SGLang does not run on a CPU: its modules do not import without CUDA. Its wheel is fetched once
(`pip download --no-deps`, cached under ~/.cache/opd-megatron/) and its files are read as text, to be parsed with
`ast` or, for the few torch-only ones, executed."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from opd_megatron.teachers.sglang import SGLANG_VERSION

CACHE = Path.home() / ".cache" / "opd-megatron" / f"sglang-{SGLANG_VERSION}"


def sglang_wheel_files(paths) -> dict[str, str]:
    """path inside the pinned SGLang wheel -> its text; the wheel is downloaded the first time (a test failure, not
    a skip, when it cannot be)."""
    wheels = sorted(CACHE.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if not wheels:
        CACHE.mkdir(parents=True, exist_ok=True)
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"sglang=={SGLANG_VERSION}",
                              "-d", str(CACHE)], capture_output=True, text=True, timeout=600)
        wheels = sorted(CACHE.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
        if not wheels:
            pytest.fail(f"could not download sglang=={SGLANG_VERSION} into {CACHE}: {run.stderr[-2000:]}")
    with zipfile.ZipFile(wheels[0]) as archive:
        return {path: archive.read(path).decode() for path in paths}


def class_node(tree: ast.AST, name: str) -> ast.ClassDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)


def function_node(tree: ast.AST, name: str, within: str | None = None):
    """The (async) function `name`, inside class `within` when given."""
    scope = class_node(tree, within) if within else tree
    return next(n for n in ast.walk(scope) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and n.name == name)


def annotated_fields(cls: ast.ClassDef) -> dict[str, str]:
    """Annotated class fields -> default source text ('' when there is none)."""
    return {n.target.id: ast.unparse(n.value) if n.value is not None else "" for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
