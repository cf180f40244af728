# The process plumbing under the tests and the jobs: test rank pools are recycled before the groups their tests leave
# behind pile up (tests/distributed_helpers.py), a torchrun worker dies with its agent and a finished process exits
# through atexit without interpreter teardown (launch/lifeline.py).
import subprocess
import sys
import time
from pathlib import Path

import distributed_helpers
from distributed_helpers import _POOLS, close_pools, run_ranks
from process_guard import alive

from parallel.dims import ParallelDims

ROOT = Path(__file__).resolve().parent.parent


def _mesh(rank, world):
    ParallelDims(world, cp_size=2, model_parallel_size=2).build_mesh("cpu")


def test_a_pool_is_recycled_before_its_groups_pile_up(tmp_path, monkeypatch):
    close_pools()
    run_ranks(_mesh, 4, tmp_path)
    pool = _POOLS[4]
    first = pool.threads()
    run_ranks(_mesh, 4, tmp_path)
    grown = pool.threads()
    assert grown > first  # every mesh's gloo groups stay in a kept rank, each with threads of its own
    monkeypatch.setattr(distributed_helpers, "MAX_RANK_THREADS", grown)
    run_ranks(_mesh, 4, tmp_path)  # now over the limit: closed after this test's work
    assert pool.closed
    run_ranks(_mesh, 4, tmp_path)
    assert _POOLS[4] is not pool and _POOLS[4].threads() < grown


def _python(code):
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"]


def test_exit_now_runs_atexit_and_flushes():
    code = (
        "import atexit; atexit.register(print, 'atexit ran'); from launch.lifeline import exit_now; "
        "print('buffered', end=' '); exit_now(3)"
    )
    r = subprocess.run(_python(code), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stdout == "buffered atexit ran\n", r


def test_exit_now_stops_thread_pools():
    """A live concurrent.futures pool (torch.compile's inductor leaves one) stops its workers from threading's exit
    hook; exit_now runs that hook before joining threads, as the interpreter does, instead of waiting forever."""
    code = (
        "from concurrent.futures import ThreadPoolExecutor; pool = ThreadPoolExecutor(2); "
        "assert pool.submit(lambda: 7).result() == 7; from launch.lifeline import exit_now; exit_now(3)"
    )
    r = subprocess.run(_python(code), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r


def test_a_worker_dies_with_its_parent():
    child = "from launch.lifeline import die_with_parent; import time; die_with_parent(); time.sleep(120)"
    parent = f"import subprocess; p = subprocess.Popen({_python(child)!r}); print(p.pid, flush=True); time.sleep(2)"
    r = subprocess.run(_python("import time; " + parent), capture_output=True, text=True, timeout=60)
    pid = int(r.stdout.split()[0])
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the child outlived its parent"
