#!/usr/bin/env bash
# Open MPI wrapper:  NP=4 launch/mpirun.sh train [config.yaml ...] [key=value ...]
# Ranks resolve themselves from OMPI_COMM_WORLD_*; rank 0 broadcasts the rendezvous with mpi4py.
set -euo pipefail
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
exec mpirun "${extra[@]}" -n "${NP:-4}" ${MPIRUN_ARGS:-} python -m launch "$@"
