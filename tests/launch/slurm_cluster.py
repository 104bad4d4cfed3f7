"""A real two-node Slurm cluster on this machine for the launch tests (see shared/docs/local-slurm.md).

`SlurmCluster(root).start()` writes a slurm.conf under `root` (every state, spool, pid and log file there too),
starts munged on a socket of its own (in a /tmp dir the munge user can enter) and slurmctld + two slurmd (`n1`, `n2`, MULTIPLE_SLURMD-style NodeName lines
on ports 17001/17002, both 127.0.0.1) and waits until both nodes are idle. Clients find the cluster through
`SLURM_CONF` (`cluster.env()`); nothing is written to /etc except the `n1` / `n2` lines of /etc/hosts (torchrun's
rendezvous resolves node names). `stop()` ends the daemons by the PIDs in their pid files.

The packages (slurmctld slurmd slurm-client munge, Debian) are installed by `.ci/run`; `missing_reason()` says why
the cluster cannot run here (not installed, not root), for a skip outside CI and a failure in CI.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

NODES = {"n1": 17001, "n2": 17002}
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")
START_TIMEOUT_S = 60.0
# A requeued job may start again only after the credential lifetime (Slurm's default 120 s); short here.
CRED_EXPIRE_S = 5
STOP_TIMEOUT_S = 20.0
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


def missing_reason() -> Optional[str]:
    """Why a Slurm cluster cannot be started here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing; .ci/run installs it with `apt-get install "
                f"slurmctld slurmd slurm-client munge`)")
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs jobs as their user)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing (the munge package creates it)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _mem_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def ensure_hosts() -> None:
    """`127.0.0.1 n1` / `127.0.0.1 n2` in /etc/hosts (added once, left in place: harmless loopback names)."""
    hosts = Path("/etc/hosts")
    known = {name for line in hosts.read_text().splitlines() if not line.lstrip().startswith("#")
             for name in line.split()[1:]}
    missing = [name for name in NODES if name not in known]
    if missing:
        with hosts.open("a") as handle:
            handle.write("".join(f"127.0.0.1 {name}\n" for name in missing))


class SlurmCluster:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        # munged runs as the munge user, which cannot enter pytest's 0700 temp dirs: its own dir under /tmp.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="opd-slurm-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.ctld_port = _free_port()
        self.started: list[Path] = []  # pid files of the daemons this object started

    def env(self, base: Optional[dict] = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _write_conf(self) -> None:
        host = socket.gethostname()
        cpus = os.cpu_count() or 1
        memory = max(_mem_available_mb() - 1024, 1024)
        for sub in ("state", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=opdlocal", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root", "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            "CredType=cred/munge", "MpiDefault=none", "MailProg=/bin/true", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "SchedulerParameters=batch_sched_delay=0", "MinJobAge=600", "ReturnToService=2", "JobRequeue=1",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd-%n.log",
            *(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory={memory}"
              for n, port in NODES.items()),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> "SlurmCluster":
        reason = missing_reason()
        if reason:
            raise RuntimeError(reason)
        busy = [p for p in NODES.values() if _port_in_use(p)]
        if busy:
            raise RuntimeError(f"ports {busy} are in use: another local Slurm cluster is running?")
        ensure_hosts()
        self._write_conf()
        munge_dir = self.munge_dir
        munge_dir.chmod(0o755)
        shutil.chown(munge_dir, "munge", "munge")
        self._daemon(["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={self.munge_socket}",
                      f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                      f"--seed-file={munge_dir}/munged.seed"], munge_dir / "munged.pid")
        self._daemon([_sbin("slurmctld"), "-c", "-f", str(self.conf)], self.root / "slurmctld.pid")
        for name in NODES:
            self._daemon([_sbin("slurmd"), "-c", "-f", str(self.conf), "-N", name],
                         self.root / f"slurmd-{name}.pid")
        self._wait_idle()
        return self

    def _daemon(self, cmd: list[str], pid_file: Path) -> None:
        """Start a daemon that forks into the background and writes `pid_file`; wait (bounded) for the file."""
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=self.env())
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        deadline = time.monotonic() + 10.0
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text().strip():
                self.started.append(pid_file)
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{cmd[0]} wrote no pid file {pid_file}; logs under {self.root}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        out = ""
        for _ in range(int(START_TIMEOUT_S / 0.5)):
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10,
                                  env=self.env())
            out = proc.stdout.strip()
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in NODES):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {START_TIMEOUT_S:.0f} s: {out!r} {proc.stderr.strip()}; "
                           f"logs under {self.root}")

    def stop(self) -> None:
        """SIGTERM each daemon by its pid file (slurmd first, munged last), SIGKILL after a bounded wait."""
        for pid_file in reversed(self.started):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started.clear()
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    # -- jobs -------------------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path | str) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30,
                              env=self.env(env), cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, RunTime, ...)."""
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              timeout=10, env=self.env())
        fields = {}
        for item in proc.stdout.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_state(self, job_id: int, states: set[str], timeout_s: float, poll_s: float = 0.5) -> dict[str, str]:
        """Poll until the job is in one of `states` (bounded in time and count); the job's fields."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        for _ in range(int(timeout_s / poll_s) + 1):
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s:.0f} s: "
                           f"{info.get('JobState')} ({info.get('Reason')})")

    def wait_done(self, job_id: int, timeout_s: float) -> dict[str, str]:
        return self.wait_state(job_id, TERMINAL_STATES, timeout_s)

    def scancel(self, *args: str) -> None:
        subprocess.run(["scancel", *args], capture_output=True, text=True, timeout=30, env=self.env(), check=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours is not alive; the daemons are not our children (they fork), so this is rare.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
