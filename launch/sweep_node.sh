#!/bin/bash
# One node's sweep workers: WORKERS_PER_NODE processes of `python -m sweeps.run`, the node's GPUs split evenly.
#
#   bash launch/sweep_node.sh SWEEP.yaml [key=value ...]             # also on a workstation, without SLURM
#
# WORKERS_PER_NODE defaults to one per GPU (CUDA_VISIBLE_DEVICES, as SLURM sets it, else nvidia-smi); use 1 when a
# trial spans the node (its config asks for every GPU: devices=8), or any divisor of the GPU count. Without GPUs it
# defaults to 1 worker. The storage and the tracking URI come from OPTUNA_STORAGE and MLFLOW_TRACKING_URI when set.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: bash launch/sweep_node.sh SWEEP.yaml [key=value ...]" >&2
  exit 2
fi
spec=$1
shift
PYTHON=${PYTHON:-python}

if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi > /dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
else
  gpus=()
fi
workers=${WORKERS_PER_NODE:-${#gpus[@]}}
(( workers >= 1 )) || workers=1
if (( ${#gpus[@]} > 0 && ${#gpus[@]} % workers != 0 )); then
  echo "error: WORKERS_PER_NODE=$workers does not divide the ${#gpus[@]} GPUs of this node (${gpus[*]})" >&2
  exit 2
fi
per=$(( ${#gpus[@]} / workers ))

shared=()
[[ -n ${OPTUNA_STORAGE:-} ]] && shared+=("storage=$OPTUNA_STORAGE")
[[ -n ${MLFLOW_TRACKING_URI:-} ]] && shared+=("tracking_uri=$MLFLOW_TRACKING_URI")

pids=()
for (( i = 0; i < workers; i++ )); do
  if (( per > 0 )); then
    slice=$(IFS=,; echo "${gpus[*]:i*per:per}")
    echo "worker $i: GPUs $slice"
    CUDA_VISIBLE_DEVICES=$slice "$PYTHON" -m sweeps.run "$spec" ${shared[@]+"${shared[@]}"} n_workers=1 "$@" &
  else
    echo "worker $i: no GPU"
    "$PYTHON" -m sweeps.run "$spec" ${shared[@]+"${shared[@]}"} n_workers=1 "$@" &
  fi
  pids+=($!)
done
# scancel / the time limit: SLURM signals every process of the step; a plain kill of this script is passed on.
trap 'kill -TERM "${pids[@]}" 2> /dev/null || true' TERM INT

status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  # `wait` returns early (> 128) when a trapped signal arrives: wait for that worker again.
  while (( code > 128 )) && kill -0 "$pid" 2> /dev/null; do
    code=0
    wait "$pid" || code=$?
  done
  (( code == 0 )) || status=$code
done
exit "$status"
