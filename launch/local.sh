#!/usr/bin/env bash
# Start N dlfx training processes on this machine, joined by jax.distributed over 127.0.0.1
# (CPU: gloo collectives). Every process runs the same `dlfx train`; process 0 writes the logs.
#
#   launch/local.sh [--dry-run] N CONFIG [dlfx train arguments ...]
#   e.g. DLFX_LOCAL_DEVICES=4 launch/local.sh 2 configs/digits_cnn.py --workdir runs/two
#
# Environment: DLFX_LOCAL_DEVICES  fake CPU devices per process (sets XLA_FLAGS; unset: leave as is)
#              DLFX_PORT           coordinator port (default: a free one)
#              DLFX_TIMEOUT        seconds before every process is killed (default 900)
#              PYTHON              interpreter (default: python3)
# A process that fails makes the launcher stop the others and exit with its status.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 2 ]] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh [--dry-run] N CONFIG [dlfx train arguments ...]" >&2
  exit 2
fi
num=$1
config=$2
shift 2
python=${PYTHON:-python3}
timeout_s=${DLFX_TIMEOUT:-900}
port=${DLFX_PORT:-}
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
xla_flags=${XLA_FLAGS:-}
if [[ -n "${DLFX_LOCAL_DEVICES:-}" ]]; then
  xla_flags="--xla_force_host_platform_device_count=${DLFX_LOCAL_DEVICES}"
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

for ((i = 0; i < num; i++)); do
  cmd=(timeout "$timeout_s" "$python" -m dlfx train --config "$config"
       --coordinator-address "127.0.0.1:$port" --num-processes "$num" --process-id "$i" "$@")
  if [[ $dry_run -eq 1 ]]; then
    echo "XLA_FLAGS='$xla_flags' ${cmd[*]}"
    continue
  fi
  XLA_FLAGS="$xla_flags" "${cmd[@]}" &
  pids+=("$!")
done
[[ $dry_run -eq 1 ]] && exit 0

status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then
    status=1
    break
  fi
done
if [[ $status -ne 0 ]]; then
  echo "local.sh: a process failed; stopping the others" >&2
  cleanup
  wait || true
  exit 1
fi
trap - EXIT
