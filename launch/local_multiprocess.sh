#!/usr/bin/env bash
# A multi-process JAX job on this machine: N processes of 8 / N virtual CPU devices each, one job of
# 8 devices, the same code paths a pod takes (each process reads its share of the data, global
# batches are assembled from the processes' parts, orbax writes one checkpoint from all of them).
#
#   bash launch/local_multiprocess.sh 2 -- --config=configs/demo.py --workdir=runs/demo_2proc
#
# Everything after -- goes to `python -m nvl_jax.train` in every process. Process 0 prints as usual;
# the others' lines carry a "[process I]" prefix. If one process fails, the others are stopped and
# the script exits with the failing status. DEVICES (default 8) sets the job's total device count;
# PYTHON (default python) the interpreter.
set -euo pipefail

usage() {
  echo "usage: bash launch/local_multiprocess.sh N -- [python -m nvl_jax.train flags...]" >&2
  echo "  runs N processes of DEVICES/N virtual CPU devices each (DEVICES=${DEVICES:-8})" >&2
  exit 2
}

[[ $# -ge 1 && "$1" != "-h" && "$1" != "--help" ]] || usage
NUM_PROCESSES="$1"
shift
[[ "${NUM_PROCESSES}" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '${NUM_PROCESSES}'" >&2; usage; }
if [[ $# -ge 1 ]]; then
  [[ "$1" == "--" ]] || { echo "expected -- before the training flags, got '$1'" >&2; usage; }
  shift
fi
DEVICES="${DEVICES:-8}"
PYTHON="${PYTHON:-python}"
if (( DEVICES % NUM_PROCESSES )); then
  echo "DEVICES=${DEVICES} does not split over ${NUM_PROCESSES} processes" >&2
  exit 2
fi

# A free port for process 0's coordination service.
PORT="$("${PYTHON}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# Each process sees only its own devices: drop any device count already in XLA_FLAGS.
BASE_XLA_FLAGS="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<< "${XLA_FLAGS:-}")"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for (( i = 0; i < NUM_PROCESSES; i++ )); do
  command=(env JAX_PLATFORMS=cpu
           XLA_FLAGS="${BASE_XLA_FLAGS} --xla_force_host_platform_device_count=$(( DEVICES / NUM_PROCESSES ))"
           "${PYTHON}" -m nvl_jax.train --coordinator="127.0.0.1:${PORT}" --num_processes="${NUM_PROCESSES}"
           --process_id="${i}" "$@")
  if (( i == 0 )); then
    "${command[@]}" &
  else
    "${command[@]}" > >(sed -u "s/^/[process ${i}] /") 2> >(sed -u "s/^/[process ${i}] /" >&2) &
  fi
  pids+=("$!")
done

# Wait for whichever process ends first; a failure stops the rest (they would wait for it forever
# in the next collective). Finished processes leave the list: bash's `wait -n` complains of a PID
# it has already reaped.
status=0
running=("${pids[@]}")
while (( ${#running[@]} )); do
  finished=""
  wait -n -p finished "${running[@]}" || { status=$?; stop_all; break; }
  left=()
  for pid in "${running[@]}"; do [[ "${pid}" == "${finished}" ]] || left+=("${pid}"); done
  running=("${left[@]+"${left[@]}"}")
done
wait "${pids[@]}" 2>/dev/null || true
exit "${status}"
