#!/usr/bin/env bash
# Launch `segtrain train` on one machine or many, through `deepspeed` (default) or `torchrun`.
#
#   launch/train.sh [options] CONFIG [extra `segtrain train` arguments, e.g. --set parallel.tp=2 --resume auto]
#
# Arguments after CONFIG that are not options of this script go to `segtrain train` (so does everything
# after `--`). Before launching, `segtrain train --check` validates the config, the layout for the world
# size and the output folder in one process: a mistake is one line here, not one traceback per rank.
#
# Options:
#   --launcher deepspeed|torchrun  which launcher runs the processes (default: deepspeed)
#   --hostfile FILE                multi-node: lines `HOST slots=N` (DeepSpeed's format); default: this machine only
#   --nproc N                      processes per node (default: GPUs on this machine, or 2 without GPUs)
#   --node-rank I                  torchrun only: which hostfile line this machine is (default: NODE_RANK or 0)
#   --dry-run                      print, for every node, the exact command it would run, and exit
#
# Environment (defaults in brackets):
#   MASTER_ADDR [first host of the hostfile, else 127.0.0.1]   MASTER_PORT [29500]
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME [unset: NCCL/gloo pick]   NCCL_IB_HCA [unset]   NCCL_DEBUG [WARN]
#   PYTHON [python3]   SEGTRAIN_SHUTDOWN_TIMEOUT [600]: torchrun waits this long (s) for the ranks to save after
#   SIGTERM/SIGINT/SIGUSR1 before killing them (DeepSpeed's launcher waits 30 s, fixed)
#
# Multi-node with deepspeed: run this once, on the first host; deepspeed reaches the others over
# passwordless ssh (pdsh). Multi-node with torchrun: run it on every host with --node-rank set.
set -euo pipefail

launcher=deepspeed hostfile="" nproc="" node_rank="${NODE_RANK:-0}" dry_run=0 config=""
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --launcher) launcher="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) awk 'NR > 1 && /^set -/ { exit } NR > 1 { print }' "$0"; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    -*) [[ -n "$config" ]] || { echo "train.sh: unknown option $1 before CONFIG (see --help)" >&2; exit 2; }
        extra+=("$1"); shift ;;  # after CONFIG: a `segtrain train` option
    *) if [[ -z "$config" ]]; then config="$1"; else extra+=("$1"); fi; shift ;;
  esac
done
[[ -n "$config" ]] || { echo "train.sh: missing CONFIG (a YAML file under configs/train/)" >&2; exit 2; }
[[ -f "$config" ]] || { echo "train.sh: config not found: $config" >&2; exit 2; }
[[ "$launcher" == deepspeed || "$launcher" == torchrun ]] || { echo "train.sh: --launcher must be deepspeed or torchrun, got $launcher" >&2; exit 2; }

if [[ -z "$nproc" ]]; then
  nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$nproc" -gt 0 ]] || nproc=2
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "train.sh: --nproc must be a positive integer, got $nproc" >&2; exit 2; }

hosts=() slots=()
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || { echo "train.sh: hostfile not found: $hostfile" >&2; exit 2; }
  while read -r host rest; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    n="$nproc"
    if [[ "$rest" =~ slots=([0-9]+) ]]; then n="${BASH_REMATCH[1]}"; fi
    hosts+=("$host"); slots+=("$n")
  done < "$hostfile"
  [[ ${#hosts[@]} -gt 0 ]] || { echo "train.sh: hostfile $hostfile lists no hosts" >&2; exit 2; }
else
  hosts=(localhost); slots=("$nproc")
fi
nnodes=${#hosts[@]}
for n in "${slots[@]}"; do
  [[ "$n" == "${slots[0]}" ]] || { echo "train.sh: every host needs the same slots (got ${slots[*]})" >&2; exit 2; }
done
per_node=${slots[0]}
world=$((nnodes * per_node))
if [[ -n "$hostfile" ]]; then master_addr="${MASTER_ADDR:-${hosts[0]}}"; else master_addr="${MASTER_ADDR:-127.0.0.1}"; fi
master_port="${MASTER_PORT:-29500}"
python="${PYTHON:-python3}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# torchrun forwards these to the ranks, which finish the step, save and exit (segtrain/train/signals.py);
# environment variables rather than flags: an older torchrun ignores them instead of failing
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export PET_SHUTDOWN_TIMEOUT="${SEGTRAIN_SHUTDOWN_TIMEOUT:-600}" TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SEGTRAIN_SHUTDOWN_TIMEOUT:-600}"

entry=(-m segtrain.cli train --config "$config" "${extra[@]}")

node_argv() {  # sets argv to the command node $1 runs (empty for deepspeed's ssh-started nodes)
  local i=$1
  argv=()
  if [[ "$launcher" == torchrun ]]; then
    argv=("$python" -m torch.distributed.run --nnodes "$nnodes" --node-rank "$i" --nproc-per-node "$per_node"
          --master-addr "$master_addr" --master-port "$master_port" "${entry[@]}")
  elif [[ $i -eq 0 ]]; then
    argv=("$python" -m deepspeed.launcher.runner)
    [[ -n "$hostfile" ]] && argv+=(--hostfile "$hostfile")
    # --no_local_rank: segtrain reads LOCAL_RANK from the environment; a `--local_rank=N` argument would precede the command
    argv+=(--num_nodes "$nnodes" --num_gpus "$per_node" --master_addr "$master_addr" --master_port "$master_port"
           --no_local_rank --module "${entry[@]:1}")
  fi
}

if [[ $dry_run -eq 1 ]]; then
  echo "launcher=$launcher nnodes=$nnodes nproc_per_node=$per_node world_size=$world master=$master_addr:$master_port"
  for i in "${!hosts[@]}"; do
    node_argv "$i"
    if [[ ${#argv[@]} -gt 0 ]]; then run=$(printf '%q ' "${argv[@]}"); else run="(started from node 0 by deepspeed over ssh)"; fi
    echo "node $i host=${hosts[$i]} ranks=$((i * per_node))-$(((i + 1) * per_node - 1)): ${run% }"
  done
  exit 0
fi

# one process checks what every rank would refuse (config, layout, output folder) before any is started
WORLD_SIZE=$world "$python" "${entry[@]}" --check >/dev/null || exit $?
if [[ "$launcher" == torchrun ]]; then node_argv "$node_rank"; else node_argv 0; fi
exec "${argv[@]}"
