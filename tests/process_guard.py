# No test leaves a job running. Every process the tests start inherits CPDIT_TEST_SESSION=<pytest's pid>; after each
# test, a job process (the launcher, torchrun's agent or a rank) that still carries it is given a grace period to
# exit, then killed and reported as that test's error. A leaked job would keep training on the CI machine's two
# cores and slow every later test into its timeout.
import os
import signal
import time
from pathlib import Path

MARK = "CPDIT_TEST_SESSION"
JOB_MARKERS = (b"-m\x00launch", b"cpdit-launch", b"torch.distributed.run", b"launch/cli.py")


def mark_session() -> None:
    os.environ[MARK] = str(os.getpid())


def _read(pid: str, name: str) -> bytes:
    try:
        return (Path("/proc") / pid / name).read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    stat = _read(str(pid), "stat")
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def job_processes() -> dict[int, str]:
    """pid -> command line of this session's job processes still alive (zombies excluded)."""
    tag = f"{MARK}={os.environ.get(MARK, '')}".encode()
    me, found = os.getpid(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        cmd = _read(entry.name, "cmdline")
        if not any(m in cmd for m in JOB_MARKERS):
            continue
        if tag in _read(entry.name, "environ").split(b"\x00") and alive(int(entry.name)):
            found[int(entry.name)] = cmd.replace(b"\x00", b" ").decode(errors="replace")[:200]
    return found


def reap_leftovers(grace_s: float = 20.0) -> dict[int, str]:
    """Wait up to `grace_s` for job processes to end, then SIGKILL what is left; returns what had to be killed."""
    deadline = time.monotonic() + grace_s
    left = job_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = job_processes()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
