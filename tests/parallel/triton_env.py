"""Triton for the CPU checks of the Triton divergence kernels (tests/parallel/test_triton_divergences.py), in a
virtual environment of its own.

Triton is not in the project's environment on purpose: megatron-core imports it on import whenever it is installed,
so it would be imported by every process the suite starts (hundreds of gloo ranks and subprocesses) and would change
the environment every other test runs in. The kernels' checks run in one child process of this venv's python
instead; on a GPU machine triton comes with CUDA torch and the `gpu` tests use it in place.

The venv:
- `OPD_TRITON_VENV` if set (CI creates it before pytest with `python -m tests.parallel.triton_env`), else
- a cached one, `~/.cache/opd-megatron/triton-<version>-venv/`: `python -m venv` from this interpreter, then
  `bin/python -m pip install --no-deps triton==<version>` (triton has no runtime requirements; `--no-deps` keeps pip
  from ever fetching a torch), the venv's own setuptools removed (older than the project environment's, it would
  shadow that one), then a `.pth` file in its site-packages that adds the site-packages of the interpreter that
  built it (`site.addsitedir`, so their own `.pth` files run too: the editable opd_megatron), from which torch 2.13
  CPU, megatron-core, numpy and pytest are imported. It is checked (triton at the pinned version from the venv;
  `pip show torch` there gives this environment's torch, not one installed into the venv) and only then renamed
  from a temporary directory to its final name, so a build that is killed never leaves a half venv. A file lock
  keeps parallel runs from building it twice. The `.pth` names the environment that built it: a cached venv used
  from another project environment (a fresh CI checkout) gets its `.pth` rewritten, a different Python version
  rebuilds it. Run its tools as `bin/python -m ...`: the console scripts' shebangs name the temporary directory.

`triton_python()` returns the venv's python (raising `TritonUnavailable` when pip cannot install triton, e.g. no
package index, and RuntimeError for anything else); `python -m tests.parallel.triton_env` builds it and prints the
venv's path.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

TRITON_VERSION = "3.9.0"
VENV_ENV = "OPD_TRITON_VENV"
PIP_TIMEOUT_S = 900.0
CHECK_TIMEOUT_S = 300.0
PTH_NAME = "opd-megatron-main-env.pth"
MARKER_NAME = ".opd-triton-ready"
PARTIAL_SUFFIX = ".partial-"


class TritonUnavailable(RuntimeError):
    """pip could not install triton into the venv (no package index, no wheel). Tests skip on it outside CI only."""


def default_venv() -> Path:
    return Path.home() / ".cache" / "opd-megatron" / f"triton-{TRITON_VERSION}-venv"


def triton_python(log: Callable[[str], None] = lambda message: print(message, file=sys.stderr)) -> str:
    """The python of a venv where `import triton` gives triton TRITON_VERSION and torch, megatron-core and
    opd_megatron are this environment's: `OPD_TRITON_VENV` if set, else the cached venv, built when absent."""
    return str(_python(ensure_venv(log)))


def ensure_venv(log: Callable[[str], None]) -> Path:
    """The venv's directory (see the module docstring); `log` gets the progress lines of a build."""
    given = os.environ.get(VENV_ENV)
    venv = Path(given) if given else default_venv()
    if given and not (venv / MARKER_NAME).exists():
        # A venv made some other way: it only has to import triton with this environment's torch.
        if not _python(venv).exists():
            raise RuntimeError(f"{VENV_ENV}={given}: no {_python(venv)}; expected a virtual environment with triton "
                               f"(`python -m tests.parallel.triton_env` builds one), or unset {VENV_ENV}")
        _check(venv)
        return venv
    if _ready(venv):
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it or rewriting its .pth: wait, look again
        built, wanted = _marker(venv), _marker_fields()
        if built != wanted:
            if all(built.get(key) == wanted[key] for key in ("triton", "python")):
                _write_pth(venv)  # built from another project environment: point it at this one
                _write_marker(venv)
            else:
                _build(venv, log)
    return venv


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _main_site_dirs() -> list[str]:
    """The site-packages directories of this interpreter (the project environment), in sys.path order."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return [directory for directory in dirs if os.path.isdir(directory)]


def _pth_text() -> str:
    # An `import` line of a .pth file is executed (site.py): addsitedir also runs those directories' own .pth files
    # (the editable install's finder), which a bare path line would not.
    return "".join(f"import site; site.addsitedir({directory!r})\n" for directory in _main_site_dirs())


def _marker_fields() -> dict[str, str]:
    return {"triton": TRITON_VERSION, "python": sys.version.split()[0], "pth": _pth_text()}


def _marker(venv: Path) -> dict[str, str]:
    try:
        return json.loads((venv / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _ready(venv: Path) -> bool:
    return _marker(venv) == _marker_fields()


def _write_pth(venv: Path) -> None:
    partial = _site_packages(venv) / f"{PTH_NAME}{PARTIAL_SUFFIX}{os.getpid()}"
    partial.write_text(_pth_text())
    os.replace(partial, _site_packages(venv) / PTH_NAME)  # a child starting now reads the old file or the new one


def _write_marker(venv: Path) -> None:
    partial = venv / f"{MARKER_NAME}{PARTIAL_SUFFIX}{os.getpid()}"
    partial.write_text(json.dumps(_marker_fields()))
    os.replace(partial, venv / MARKER_NAME)


def _build(venv: Path, log: Callable[[str], None]) -> None:
    """Build the venv in a temporary sibling directory and rename it to `venv` once it is complete and checked."""
    for stale in venv.parent.glob(f"{venv.name}{PARTIAL_SUFFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # builds that were killed (we hold the lock: none is running)
    partial = venv.parent / f"{venv.name}{PARTIAL_SUFFIX}{os.getpid()}"
    start = time.monotonic()
    log(f"creating the Triton venv {venv} (triton=={TRITON_VERSION}, about a minute) ...")
    try:
        # From inside the project venv too: `venv` bases the new one on the base interpreter, not on this venv.
        _run([sys.executable, "-m", "venv", str(partial)], "python -m venv", PIP_TIMEOUT_S)
        # Before the .pth exists, so that pip sees only the new venv: `--no-deps` and nothing to be "already
        # satisfied" by the project environment's packages.
        try:
            _run([str(_python(partial)), "-m", "pip", "install", "--quiet", "--no-deps", f"triton=={TRITON_VERSION}"],
                 f"pip install --no-deps triton=={TRITON_VERSION}", PIP_TIMEOUT_S)
        except RuntimeError as error:
            raise TritonUnavailable(str(error)) from None
        # The venv's own setuptools (older than the project environment's) would shadow that one for torch.
        _run([str(_python(partial)), "-m", "pip", "uninstall", "--quiet", "-y", "setuptools"],
             "pip uninstall setuptools", PIP_TIMEOUT_S)
        _write_pth(partial)
        _check(partial)
        _write_marker(partial)
        if venv.exists():
            shutil.rmtree(venv)  # built for another Python version (we hold the lock: nobody is using it to build)
        os.rename(partial, venv)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"Triton venv ready in {time.monotonic() - start:.0f} s")


def _check(venv: Path) -> None:
    """Raise RuntimeError unless the venv imports triton TRITON_VERSION from itself and this environment's torch
    from this environment (`pip show torch` there: this torch's version, not in the venv)."""
    torch_version = importlib.metadata.version("torch")
    code = ("import json, triton, torch; print(json.dumps({'triton': triton.__version__, 'triton_file': "
            "triton.__file__, 'torch': torch.__version__, 'torch_file': torch.__file__}))")
    found = json.loads(_run([str(_python(venv)), "-c", code], f"`import triton, torch` in {venv}").splitlines()[-1])
    venv_root = str(venv.resolve()) + os.sep
    problems = []
    if found["triton"] != TRITON_VERSION or not str(Path(found["triton_file"]).resolve()).startswith(venv_root):
        problems.append(f"triton {found['triton']} from {found['triton_file']}, expected {TRITON_VERSION} from the "
                        f"venv")
    if found["torch"] != torch_version or str(Path(found["torch_file"]).resolve()).startswith(venv_root):
        problems.append(f"torch {found['torch']} from {found['torch_file']}, expected this environment's "
                        f"{torch_version} from {_main_site_dirs()}")
    shown = _run([str(_python(venv)), "-m", "pip", "show", "torch"], f"pip show torch in {venv}")
    fields = dict(line.split(": ", 1) for line in shown.splitlines() if ": " in line)
    if fields.get("Version") != torch_version or str(Path(fields.get("Location", "")).resolve()).startswith(venv_root):
        problems.append(f"`pip show torch` in the venv: {fields.get('Version')} at {fields.get('Location')}, expected "
                        f"{torch_version} outside the venv (no torch may be installed into it)")
    if problems:
        raise RuntimeError(f"Triton venv {venv}: " + "; ".join(problems))


def _run(cmd: list[str], what: str, timeout: float = CHECK_TIMEOUT_S) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_clean_env())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no result after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    return proc.stdout


def _clean_env() -> dict[str, str]:
    """This process's environment without the project venv's activation and without interpreter mode (the venv
    is built and checked as itself)."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "TRITON_INTERPRET"):
        env.pop(key, None)
    return env


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


if __name__ == "__main__":  # CI: build (or find) the venv outside pytest's per-test timeout; stdout is its path
    try:
        print(ensure_venv(lambda message: print(message, file=sys.stderr)))
    except RuntimeError as error:
        sys.exit(f"tests.parallel.triton_env: {error}")
