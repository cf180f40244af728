# A real one-node SLURM cluster for the launch tests: Debian's slurmctld + slurmd + munge, installed on demand
# (as root, with apt-get), configured from tests/slurm/slurm.conf.in with state and spool under a temporary
# directory, started in the background and stopped by the pids in their pid files (never by name). The daemons a
# cluster starts are listed in REGISTRY; a run killed before its teardown leaves them listed, and the next cluster
# stops them first (each pid checked against its daemon's name in /proc before it is signalled).
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TEMPLATE = Path(__file__).parent / "slurm" / "slurm.conf.in"
MUNGE_PID = Path("/run/munge/munged.pid")
REGISTRY = Path(tempfile.gettempdir()) / "cpdit-test-slurm-daemons.json"
DAEMONS = ("slurmctld", "slurmd", "munged")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_packages() -> str | None:
    """Install SLURM and munge if missing. Returns why the tests must skip, or None."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"SLURM is not installed and cannot be (needs root and apt-get: apt-get install {' '.join(PACKAGES)})"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    r = _run(cmd, env=env, timeout=600)
    if r.returncode:
        _run(["apt-get", "update"], env=env, timeout=600)
        r = _run(cmd, env=env, timeout=600)
    if r.returncode:
        return f"could not install SLURM from Debian's packages: {r.stderr[-500:]}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def start_munge() -> int | None:
    """Start munged unless one runs; returns the pid we started (to stop), else None."""
    pid = _pid(MUNGE_PID)
    if pid and _alive(pid):
        return None
    run_dir = MUNGE_PID.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        shutil.chown(key, "munge", "munge")
    r = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], timeout=30)
    if r.returncode:
        raise RuntimeError(f"munged did not start: {r.stderr}")
    for _ in range(50):
        pid = _pid(MUNGE_PID)
        if pid:
            return pid
        time.sleep(0.1)
    raise RuntimeError("munged started but wrote no pid file")


def stop_pid(pid: int | None, timeout: float = 10) -> None:
    if not pid or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _is_daemon(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in DAEMONS
    except OSError:
        return False


def reap_stale() -> list[int]:
    """Stop the daemons a killed earlier run left running (listed in REGISTRY); returns their pids."""
    try:
        pids = [int(p) for p in json.loads(REGISTRY.read_text())]
    except (OSError, ValueError, TypeError):
        return []
    stale = [p for p in pids if _alive(p) and _is_daemon(p)]
    for pid in stale:
        stop_pid(pid)
    REGISTRY.unlink(missing_ok=True)
    return stale


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(
            TEMPLATE.read_text().format(host=self.host, dir=self.root, ctld_port=_free_port(), d_port=_free_port())
        )
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munge = None

    def start(self) -> "SlurmCluster":
        reap_stale()
        self.munge = start_munge()
        for daemon in ("slurmctld", "slurmd"):
            r = _run([daemon, "-f", str(self.conf)], env=self.env, timeout=60)
            if r.returncode:
                raise RuntimeError(f"{daemon} did not start: {r.stderr}\n{self.logs()}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = _run(["sinfo", "-h", "-o", "%T"], env=self.env, timeout=30).stdout.strip()
            if state == "idle":
                self._register()  # the daemons have written their pid files by now
                return self
            time.sleep(0.2)
        self._register()
        raise RuntimeError(f"the SLURM node never became idle (state {state!r})\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            p.read_text()[-2000:] for p in (self.root / "slurmctld.log", self.root / "slurmd.log") if p.is_file()
        )

    def _register(self) -> None:
        pids = [_pid(self.root / "slurmd.pid"), _pid(self.root / "slurmctld.pid"), self.munge]
        REGISTRY.write_text(json.dumps([p for p in pids if p]))

    def stop(self) -> None:
        stop_pid(_pid(self.root / "slurmd.pid"))
        stop_pid(_pid(self.root / "slurmctld.pid"))
        stop_pid(self.munge)
        REGISTRY.unlink(missing_ok=True)

    def job_state(self, job_id: str) -> dict:
        out = _run(["scontrol", "show", "job", job_id, "-o"], env=self.env, timeout=30).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
