#!/usr/bin/env bash
# Render launch/slurm/train.sbatch.in into a job script.
#   launch/slurm/render.sh --config configs/train/llama3-8b-128k.yaml --nodes 4 [--gpus-per-node 8]
#       [--partition gpu] [--time 48:00:00] [--job-name segtrain] [--cpus-per-task 64] [--log-dir logs]
#       [--workdir DIR] [--out job.sbatch]          (without --out: print to stdout)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
config="" nodes="" gpus=8 partition=gpu time=48:00:00 name=segtrain cpus=64 logs=logs workdir="$PWD" out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2" ;; --nodes) nodes="$2" ;; --gpus-per-node) gpus="$2" ;; --partition) partition="$2" ;;
    --time) time="$2" ;; --job-name) name="$2" ;; --cpus-per-task) cpus="$2" ;; --log-dir) logs="$2" ;;
    --workdir) workdir="$2" ;; --out) out="$2" ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "render.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
[[ -n "$config" ]] || { echo "render.sh: --config is required" >&2; exit 2; }
for pair in "nodes:$nodes" "gpus-per-node:$gpus" "cpus-per-task:$cpus"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || { echo "render.sh: --${pair%%:*} must be a positive integer, got '${pair#*:}'" >&2; exit 2; }
done
[[ "$time" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || { echo "render.sh: --time must look like 48:00:00, got '$time'" >&2; exit 2; }
esc() { printf '%s' "$1" | sed 's/[&|\\]/\\&/g'; }
script=$(sed -e "s|@JOB_NAME@|$(esc "$name")|g" -e "s|@NODES@|$nodes|g" -e "s|@GPUS_PER_NODE@|$gpus|g" \
  -e "s|@CPUS_PER_TASK@|$cpus|g" -e "s|@TIME@|$time|g" -e "s|@PARTITION@|$(esc "$partition")|g" \
  -e "s|@LOG_DIR@|$(esc "$logs")|g" -e "s|@WORKDIR@|$(esc "$workdir")|g" -e "s|@CONFIG@|$(esc "$config")|g" \
  "$here/train.sbatch.in")
if [[ -n "$out" ]]; then
  tmp="$out.tmp.$$"; printf '%s\n' "$script" > "$tmp"; chmod +x "$tmp"; mv "$tmp" "$out"
else
  printf '%s\n' "$script"
fi
