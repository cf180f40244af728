# Two "nodes" on one machine: Linux network namespaces joined by a veth pair (10.200.0.1 / 10.200.0.2, addresses
# that exist only inside them), each with its own hostname and hosts file. On each, cpdit-launch --nnodes 2
# --nproc-per-node 2 with a c10d rendezvous on node1: the default job's tp groups stay inside a node, its cp groups
# cross the two (tests/test_dims.py checks the groups). One
# node's workers are killed; both agents restart their workers, the job resumes from the newest checkpoint and
# ends with the weights of an uninterrupted single-node run.
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from job_helpers import ENV, TEST_MODEL, launch, losses, metrics, wait_for_step
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # two network-namespace nodes

RUN = [
    "train.steps=8",
    "checkpoint.every=2",
    "checkpoint.keep_last=4",
    "data.num_samples=16",
    "logging.wandb=false",
    "sample.at_end=false",
    "train.export=true",
    "optim.warmup_steps=2",
]


def sh(*cmd, check=True):
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr}")
    return r


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("network namespaces need root, iproute2 and util-linux (nsenter, unshare)")
    tag = str(os.getpid() % 100000)
    names = [f"cpdit{tag}a", f"cpdit{tag}b"]
    if sh("ip", "netns", "add", names[0], check=False).returncode:
        pytest.skip("this machine refuses network namespaces (ip netns add failed)")
    tmp = tmp_path_factory.mktemp("nodes")
    try:
        sh("ip", "netns", "add", names[1])
        sh("ip", "link", "add", f"cv{tag}a", "type", "veth", "peer", "name", f"cv{tag}b")
        for i, ns in enumerate(names):
            veth = f"cv{tag}{'ab'[i]}"
            sh("ip", "link", "set", veth, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"10.200.0.{i + 1}/24", "dev", veth)
            sh("ip", "-n", ns, "link", "set", veth, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        hosts = tmp / "hosts"
        hosts.write_text("127.0.0.1 localhost\n10.200.0.1 node1\n10.200.0.2 node2\n")
        yield tmp, names, hosts
    finally:
        for ns in names:
            sh("ip", "netns", "del", ns, check=False)


def on_node(ns, hostname, hosts, cmd):
    """cmd inside namespace ns with its own hostname and /etc/hosts (nsenter, not `ip netns exec`)."""
    script = f'mount --bind {hosts} /etc/hosts && hostname {hostname} && exec "$@"'
    return [
        "timeout",
        "-k",
        "10",
        "300",
        "nsenter",
        f"--net=/run/netns/{ns}",
        "unshare",
        "--mount",
        "--uts",
        "sh",
        "-c",
        script,
        "sh",
        *cmd,
    ]


def descendants(pid):
    kids = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_two_node_torchrun_with_elastic_restart(nodes):
    tmp, names, hosts = nodes
    launch(tmp, "single", *RUN)  # the reference: the same 4 ranks on one node
    agents = []
    t0 = time.monotonic()
    for i, ns in enumerate(names):
        cmd = [
            "python",
            "-m",
            "launch",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--rdzv-endpoint",
            "node1:29400",
            "--rdzv-id",
            "cpdit-test",
            "--max-restarts",
            "1",
            "train",
            f"train.output_dir={tmp}",
            "train.run_name=two",
            *TEST_MODEL,
            *RUN,
            "debug.step_sleep_s=0.3",
        ]
        log = open(tmp / f"node{i + 1}.log", "w")
        agents.append(
            subprocess.Popen(
                on_node(ns, f"node{i + 1}", hosts, cmd), env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=tmp
            )
        )
    wait_for_step(tmp / "two", 3, agents[0], timeout=180)
    started = [e for e in metrics(tmp / "two") if e.get("event") == "start"][0]
    assert started["nodes"] == 2 and "world=4" in started["layout"]
    workers = [p for p in descendants(agents[1].pid) if " -m launch train" in cmdline(p)]
    assert len(workers) == 2, [cmdline(p) for p in descendants(agents[1].pid)]
    t_kill = time.monotonic()
    for p in workers:
        os.kill(p, 9)
    while not [e for e in metrics(tmp / "two") if e.get("event") == "restart"]:
        assert time.monotonic() - t_kill < 120, "no restart within 120 s"
        time.sleep(0.1)
    restart_s = time.monotonic() - t_kill
    codes = [a.wait(timeout=300) for a in agents]
    logs = "\n".join((tmp / f"node{i}.log").read_text()[-3000:] for i in (1, 2))
    assert codes == [0, 0], logs
    resumed = [e for e in metrics(tmp / "two") if e.get("event") == "resume"]
    assert resumed and resumed[-1]["step"] in (2, 4)
    ref, got = (
        load_file(str(tmp / "single/export/model.safetensors")),
        load_file(str(tmp / "two/export/model.safetensors")),
    )
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    a, _ = losses(tmp / "single")
    b, _ = losses(tmp / "two")
    assert b[8] == pytest.approx(a[8], rel=1e-5)
    print(f"two nodes: kill -> restart logged {restart_s:.1f} s; total {time.monotonic() - t0:.1f} s")


ELASTIC = [
    "train.steps=10",
    "checkpoint.every=2",
    "checkpoint.keep_last=4",
    "data.num_samples=16",
    "logging.wandb=false",
    "sample.at_end=false",
    "train.export=false",
    "optim.warmup_steps=2",
    "parallel.cp_size=2",
    "parallel.model_parallel_size=1",
    "debug.step_sleep_s=0.3",
]


def test_losing_a_node_the_job_goes_on_with_the_other(nodes):
    """--nnodes 1:2 (elastic): node 2 disappears (its agent and workers killed) at step >= 3; node 1's agent
    restarts its workers, the rendezvous admits the one node left, and the job resumes from the last checkpoint
    as cp=2 x dp=1 (it was cp=2 x dp=2), losing at most the steps since that checkpoint, and finishes."""
    tmp, names, hosts = nodes
    agents = []
    for i, ns in enumerate(names):
        cmd = [
            "python",
            "-m",
            "launch",
            "--nnodes",
            "1:2",
            "--nproc-per-node",
            "2",
            "--rdzv-endpoint",
            "node1:29401",
            "--rdzv-id",
            "cpdit-elastic",
            "--max-restarts",
            "2",
            "train",
            f"train.output_dir={tmp}",
            "train.run_name=elastic",
            *TEST_MODEL,
            *ELASTIC,
        ]
        log = open(tmp / f"elastic{i + 1}.log", "w")
        agents.append(
            subprocess.Popen(
                on_node(ns, f"node{i + 1}", hosts, cmd), env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=tmp
            )
        )
    run = tmp / "elastic"
    wait_for_step(run, 3, agents[0], timeout=180)
    started = [e for e in metrics(run) if e.get("event") == "start"][0]
    assert started["nodes"] == 2 and "world=4" in started["layout"] and "dp_shard=2" in started["layout"]
    doomed = [agents[1].pid, *descendants(agents[1].pid)]
    at_kill = max(r["step"] for r in metrics(run) if "loss" in r and "event" not in r)
    for pid in doomed:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    agents[1].wait(timeout=30)
    code = agents[0].wait(timeout=400)
    logs = (tmp / "elastic1.log").read_text()[-4000:]
    assert code == 0, logs
    rows = metrics(run)
    resumed = [e for e in rows if e.get("event") == "resume"]
    assert resumed, logs
    assert "world=2" in resumed[-1]["layout"] and "dp_shard=1" in resumed[-1]["layout"], resumed[-1]
    assert resumed[-1]["step"] >= at_kill - 2, (resumed[-1], at_kill)  # nothing lost beyond the interval
    steps = sorted({r["step"] for r in rows if "loss" in r and "event" not in r})
    assert steps == list(range(1, 11)), steps
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)
