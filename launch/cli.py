# `cpdit-launch` / `python -m launch`: outside any launcher it validates the topology and starts torchrun;
# inside torchrun, mpirun or srun it runs the job in this process.
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from launch.config import ConfigError, JobConfig, load_config
from launch.env import LaunchEnvError, resolve_dist_env
from launch.lifeline import die_with_parent, exit_now
from launch.preflight import preflight
from parallel.dims import TopologyError

COMMANDS = ("train", "sample", "precompute", "selfcheck")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpdit-launch",
        description="Launch a cpdit job. Outside a launcher this starts torchrun; under torchrun, mpirun or "
        "srun it runs the job in-process.",
    )
    g = p.add_argument_group("launcher (used when cpdit-launch starts torchrun itself)")
    g.add_argument(
        "--nnodes",
        default="1",
        help="number of nodes, or MIN:MAX for an elastic job that goes on with fewer nodes when one is lost "
        "(default 1)",
    )
    g.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes per node (default: dist.nproc_per_node of the config, 4)",
    )
    g.add_argument("--node-rank", type=int, default=None, help="this node's index (static rendezvous)")
    g.add_argument("--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous (multi-node)")
    g.add_argument("--rdzv-id", default=None, help="rendezvous/job id shared by all nodes (default cpdit)")
    g.add_argument("--max-restarts", type=int, default=0, help="elastic restarts after a worker failure")
    k = p.add_argument_group("parallelism knobs (override the config)")
    k.add_argument("--cp-size", type=int, default=None, help="context-parallel degree (parallel.cp_size)")
    k.add_argument(
        "--model-parallel-size", type=int, default=None, help="tensor-parallel degree (parallel.model_parallel_size)"
    )
    k.add_argument("--ulysses-size", type=int, default=None, help="Ulysses part of cp (parallel.ulysses_size)")
    p.add_argument(
        "command",
        choices=COMMANDS,
        help="train, sample, precompute (encode the dataset once: precompute.output_dir), or selfcheck (mesh + "
        "collectives); `cpdit-launch plan --help` predicts which layouts fit",
    )
    p.add_argument(
        "rest",
        nargs="*",
        metavar="config.yaml | key=value",
        help="YAML files merged left to right, then key=value overrides",
    )
    return p


def split_rest(rest: Sequence[str]) -> tuple[list[str], list[str]]:
    files = [r for r in rest if "=" not in r]
    overrides = [r for r in rest if "=" in r]
    return files, overrides


def knob_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in (
        ("cp_size", "parallel.cp_size"),
        ("model_parallel_size", "parallel.model_parallel_size"),
        ("ulysses_size", "parallel.ulysses_size"),
    ):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def node_range(nnodes: str) -> tuple[int, int]:
    """--nnodes N or MIN:MAX -> (min, max)."""
    lo, _, hi = str(nnodes).partition(":")
    try:
        bounds = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(
            f"--nnodes={nnodes!r} is not a number of nodes N or a range MIN:MAX (e.g. 2 or 1:2)"
        ) from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ConfigError(f"--nnodes={nnodes!r}: need 1 <= MIN <= MAX")
    return bounds


def torchrun_command(
    args: argparse.Namespace, nproc: int, forwarded: list[str], shutdown_timeout_s: float = 120
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={args.nnodes}",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={args.max_restarts}",
        f"--shutdown-timeout={int(shutdown_timeout_s)}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",  # forwarded to the workers: preemption
    ]
    if args.rdzv_endpoint:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"--rdzv-endpoint={args.rdzv_endpoint!r} is not host:port with a TCP port in 1..65535 "
                "(e.g. node1:29400)"
            )
        cmd += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.rdzv_endpoint}",
            f"--rdzv-id={args.rdzv_id or 'cpdit'}",
        ]
        if args.node_rank is not None:
            cmd.append(f"--node-rank={args.node_rank}")
    elif node_range(args.nnodes)[1] > 1:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint host:port (the rendezvous on node 0)")
    else:
        cmd.append("--standalone")
    return cmd + ["-m", "launch", *forwarded]


def run_job(command: str, cfg: JobConfig, environ: Mapping[str, str]) -> int:
    """Run `command` in this process as one rank of the job described by `environ`."""
    env = resolve_dist_env(environ)
    if env.launcher == "torchrun" and "TORCHELASTIC_RUN_ID" in environ:  # a worker of torchrun's agent
        die_with_parent()  # an agent killed outright takes its workers with it (launch/lifeline.py)
    preflight(cfg, env.world_size, command)  # before any process group exists: no hang on bad input
    try:
        return _run(command, cfg, env)
    except Exception as err:
        from launch.failure import record

        record(Path(cfg.train.output_dir) / cfg.train.run_name, env.rank, err)
        raise


def _run(command: str, cfg: JobConfig, env) -> int:
    if command == "train":
        from launch.job.train import train

        return train(cfg, env)
    if command == "sample":
        from launch.job.sample import sample_job

        return sample_job(cfg, env)
    if command == "precompute":
        from launch.job.precompute import precompute

        return precompute(cfg, env)
    from launch.selfcheck import selfcheck

    return selfcheck(cfg, env)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # no processes: predicts which layouts fit (launch/plan.py)
        from launch.plan import main as plan_main

        return plan_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    files, overrides = split_rest(args.rest)
    try:
        cfg = load_config(*files, overrides=overrides + knob_overrides(args))
        env = resolve_dist_env(environ)
        if env.launcher != "single":
            return run_job(args.command, cfg, environ)
        nproc = args.nproc_per_node or cfg.dist.nproc_per_node
        lo, hi = node_range(args.nnodes)
        if nproc < 1:
            raise ConfigError(f"--nproc-per-node={nproc} must be >= 1")
        world = hi * nproc
        for nodes in range(lo, hi):  # an elastic job may go on with any node count in the range: each must fit
            try:
                preflight(cfg, nodes * nproc, args.command)
            except (ConfigError, TopologyError) as err:
                raise ConfigError(
                    f"--nnodes={args.nnodes}: with {nodes} node(s) ({nodes * nproc} ranks) the job cannot run: {err} "
                    "Choose a node range whose every size fits the layout (e.g. parallel.model_parallel_size and "
                    "parallel.cp_size that divide the ranks of one node)"
                ) from None
        dims = preflight(cfg, world, args.command)
        if world == 1:
            return run_job(args.command, cfg, environ)
        forwarded = [args.command, *files, *overrides, *knob_overrides(args)]
        cmd = torchrun_command(args, nproc, forwarded, cfg.dist.shutdown_timeout_s)
    except (ConfigError, TopologyError, LaunchEnvError) as err:
        print(f"cpdit-launch: error: {err}", file=sys.stderr)
        return 2
    print(f"cpdit-launch: {dims.describe()} -> {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    return run_torchrun(cmd[3:], Path(cfg.train.output_dir) / cfg.train.run_name)


def run_torchrun(torchrun_args: list[str], run_dir: Path) -> int:
    """torchrun's elastic agent, in this process (signals from SLURM or the shell reach it directly). SIGTERM and
    SIGUSR1 are forwarded to the workers, which checkpoint and stop (launch/job/preemption.py); the exit code says
    what happened: 0 done, EXIT_PREEMPTED checkpointed after a signal, EXIT_HANG hang detected, 1 failed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from launch.job.preemption import EXIT_PREEMPTED, read_marker
    from launch.job.watchdog import EXIT_HANG

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torch 2.13: with the rendezvous TCP store shared with the workers, an elastic restart reads the previous
    # attempt's gloo addresses ("connectFullMesh failed ... Connection refused"); a store per attempt fixes it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    started = time.time()
    try:
        torchrun_main(torchrun_args)
        code = 0
    except SignalException as err:
        code = 128 + int(err.sigval)
    except ChildFailedError as err:
        print(err.format_msg(), file=sys.stderr, flush=True)
        code = EXIT_HANG if any(f.exitcode == EXIT_HANG for f in err.failures.values()) else 1
        from launch.failure import root_cause

        cause = root_cause(run_dir, started)
        if cause is not None:
            print(
                f"cpdit-launch: the job failed: {cause}. Each rank's full log is above (prefixed [rankN]).",
                file=sys.stderr,
                flush=True,
            )
    marker = read_marker(run_dir, started)
    if marker is not None:
        print(
            f"cpdit-launch: preempted at step {marker['step']}; checkpoint {marker['checkpoint']}; exit "
            f"{EXIT_PREEMPTED} (rerun the same command to resume)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_PREEMPTED
    return code


def run() -> None:
    """The `cpdit-launch` and `python -m launch` entry: main(), then a quick exit (launch/lifeline.py)."""
    exit_now(main())


if __name__ == "__main__":
    run()
