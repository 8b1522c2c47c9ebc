#!/usr/bin/env bash
# One device call for the megatron model: GPU tests, then training benchmarks. Logs go to $OUT.
# Usage on the GPU machine (repo root): tools/megatron_gpu_check.sh [single|multi]
set -u
part=${1:-multi}
out=${OUT:-runs/megatron_gpu_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SEGTRAIN_125M_STEPS=${SEGTRAIN_125M_STEPS:-200}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
if [[ $part == multi ]]; then
  timeout 170 python3 -m pytest -q -m gpu -x -s tests/test_megatron_gpu.py -k "equals_portable or tp2_and_pp2" 2>&1 | tee "$out/tests_model.log" | tail -4
  timeout 160 python3 -m pytest -q -m gpu -s tests/test_megatron_gpu.py -k "loop" 2>&1 | tee "$out/tests_loop.log" | grep -E "^\{|passed|failed|Error|error" | tail -8
  timeout $((400 - $(date +%s) + t0)) torchrun --nproc-per-node 2 tools/bench_train.py --lengths 32768 --megatron --no-causal --out "$out/bench_tp2" 2>&1 | tee "$out/bench_tp2.log" | grep -E "^\||Error" | tail -6
elif [[ $part == final ]]; then  # after `multi`: the loop on 2 GPUs, the TP=1 benchmark, the 125M run
  timeout 170 python3 -m pytest -q -m gpu -s tests/test_megatron_gpu.py -k "loop" 2>&1 | tee "$out/tests_loop.log" | grep -E "^\{|passed|failed|Error" | tail -8
  CUDA_VISIBLE_DEVICES=0 timeout 110 python3 tools/bench_train.py --lengths 32768 --megatron --no-causal --out "$out/bench_tp1" 2>&1 | tee "$out/bench_tp1.log" | grep -E "^\||Error" | tail -6
  CUDA_VISIBLE_DEVICES=0 timeout $((405 - $(date +%s) + t0)) python3 -m pytest -q -m gpu -s tests/test_megatron_gpu.py -k "125m" 2>&1 | tee "$out/tests_125m.log" | grep -E "^\{|passed|failed|Error" | tail -6
elif [[ $part == pp ]]; then  # the pipeline-parallel loop (megatron schedule + DeepSpeed ZeRO 1/2), 2 GPUs
  timeout 300 python3 -m pytest -q -m gpu -s tests/test_megatron_gpu.py -k "loop and pp2" 2>&1 | tee "$out/tests_loop_pp.log" | grep -E "^\{|passed|failed|Error" | tail -12
else
  timeout 150 python3 tools/bench_train.py --lengths 32768 --megatron --no-causal --out "$out/bench_tp1" 2>&1 | tee "$out/bench_tp1.log" | grep -E "^\||Error" | tail -6
  timeout $((400 - $(date +%s) + t0)) python3 -m pytest -q -m gpu -s tests/test_megatron_gpu.py -k "125m or equals_portable" 2>&1 | tee "$out/tests_single.log" | grep -E "^\{|passed|failed|Error" | tail -6
fi
echo "== $part done in $(( $(date +%s) - t0 )) s"
