# Shared fixtures: make the repository importable in spawned ranks and keep per-test threads at one.
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from distributed_helpers import close_pools  # noqa: E402
from process_guard import mark_session, reap_leftovers  # noqa: E402

mark_session()


@pytest.fixture(autouse=True)
def no_leftover_jobs():
    """A test that leaves a job process running fails here, after the process is killed (tests/process_guard.py)."""
    yield
    leaked = reap_leftovers()
    if leaked:
        pytest.fail(f"the test left {len(leaked)} job process(es) running (killed now): {leaked}", pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def fresh_pools_per_module():
    """Test ranks do not outlive their module: idle pools with a module's groups would tax every later test."""
    yield
    close_pools()


@pytest.fixture
def nothing_starts(monkeypatch):
    """For bad input refused by `launch.cli.main` in this process: reaching torchrun's agent, the job itself or a
    process group fails the test (the refusal must come before any of them, so nothing hangs or is written)."""
    reached: list[str] = []

    def refuse(what):
        def reach(*args, **kwargs):
            reached.append(what)
            raise AssertionError(f"bad input reached {what}")

        return reach

    monkeypatch.setattr("launch.cli.run_torchrun", refuse("torchrun's agent"))
    monkeypatch.setattr("launch.cli._run", refuse("the job"))
    monkeypatch.setattr("torch.distributed.init_process_group", refuse("init_process_group"))
    yield reached
    assert not reached, reached
