"""A real one-host Slurm for the tests: munged, slurmctld and slurmd from Debian's packages, started as
root in a temporary folder (their own key, socket, state, ports and logs; nothing under /etc)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def missing() -> str | None:
    """Why a one-host Slurm cannot start here, or None."""
    absent = [name for name in DAEMONS if not shutil.which(name) and not Path(f"/usr/sbin/{name}").exists()]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge; .ci/run installs them)"
    if os.geteuid() != 0:
        return "a one-host Slurm starts its daemons as root"
    return None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.socket = root / "munge" / "munge.sock"
        (root / "slurm.conf").write_text("\n".join([
            "ClusterName=tests", f"SlurmctldHost={self.host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
            f"SlurmctldPort={_port()}", f"SlurmdPort={_port()}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2", "JobRequeue=1",
            "SchedulerType=sched/builtin",
            f"NodeName={self.host} CPUs={os.cpu_count() or 2} State=UNKNOWN",
            "PartitionName=tests Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def start(self) -> "SlurmCluster":
        munge = self.root / "munge"
        subprocess.run([_sbin("munged"), "--force", f"--key-file={munge / 'munge.key'}", f"--socket={self.socket}",
                        f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                        f"--seed-file={munge / 'seed'}"], check=True, env=self.env)
        subprocess.run([_sbin("slurmctld"), "-i"], check=True, env=self.env)
        subprocess.run([_sbin("slurmd")], check=True, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T").stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm did not come up: sinfo says {state!r}\n{self.logs()}")

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False)
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"):
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), 15)
                except (ProcessLookupError, ValueError):
                    pass

    def run(self, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, check=check, env={**self.env, **(env or {})},
                              timeout=60)

    def submit(self, script: str, args: list[str], cwd: Path, output: Path, env: dict[str, str]) -> str:
        proc = self.run("sbatch", "--parsable", f"--chdir={cwd}", f"--output={output}", script, *args, env=env)
        return proc.stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, FAILED, ...)."""
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "UNKNOWN"

    def restarts(self, job: str) -> int:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        return next((int(w.split("=", 1)[1]) for w in out.split() if w.startswith("Restarts=")), 0)

    def wait(self, job: str, timeout: float = 300) -> str:
        """Wait for the job to end (a requeued job pending its begin time is started at once)."""
        deadline, pending_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            state = self.state(job)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            pending_since = (pending_since or time.monotonic()) if state == "PENDING" else None
            # Slurm holds a requeued job back for a while; release it, but not in the seconds after the
            # requeue, while slurmd still refuses the job's revoked credential ("Job credential revoked").
            if pending_since is not None and self.restarts(job) and time.monotonic() - pending_since > 3:
                self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
                pending_since = time.monotonic()
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout} s\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in (self.root / "slurmctld.log", self.root / "slurmd.log")
                         if p.is_file())
