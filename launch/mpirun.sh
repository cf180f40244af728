#!/usr/bin/env bash
# Open MPI wrapper:  NP=4 launch/mpirun.sh train [config.yaml ...] [key=value ...]
# Ranks resolve themselves from OMPI_COMM_WORLD_*; rank 0 broadcasts the rendezvous with mpi4py. MPIRUN_ARGS go to
# mpirun (hosts, mapping). With no MPIRUN_ARGS and more ranks than this machine has cores, the ranks share cores
# (--oversubscribe; Open MPI refuses to start them otherwise).
set -euo pipefail
np="${NP:-4}"
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
[ -z "${MPIRUN_ARGS:-}" ] && [ "$np" -gt "$(nproc)" ] && extra+=(--oversubscribe)
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of arguments
exec mpirun "${extra[@]}" -n "$np" ${MPIRUN_ARGS:-} python -m launch "$@"
