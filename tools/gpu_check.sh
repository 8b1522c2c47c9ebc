#!/usr/bin/env bash
# One device call that checks the GPU paths after a change: GPU tests, then one training benchmark.
# Usage on the GPU machine (repo root, .whl carried): tools/gpu_check.sh [PART...]; logs go to $OUT.
# Parts: attention (flex/flash vs reference, carry_grad), cp (CP over NCCL: operator, flex path, loop),
# megatron (model vs portable, TP=2/PP=2 vs TP=1, PP loop), bench (tools/bench_train.py, 1B shape, T=32K).
set -u
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
summary() { grep -E "passed|failed|error" "$1" | tail -1; }
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(attention cp megatron bench)
for part in "${parts[@]}"; do
  case $part in
    attention) timeout 240 python3 -m pytest -q -m gpu -x tests/test_attention_gpu.py >"$out/attention.log" 2>&1
               echo "attention: $(summary "$out/attention.log")" ;;
    cp) timeout 240 python3 -m pytest -q -m gpu tests/test_parallel_flex.py tests/test_parallel_context.py \
          tests/test_train_cp.py >"$out/cp.log" 2>&1
        echo "cp: $(summary "$out/cp.log")" ;;
    megatron) timeout 420 python3 -m pytest -q -m gpu tests/test_megatron_gpu.py \
                -k "equals_portable or tp2_and_pp2 or (loop and pp2)" >"$out/megatron.log" 2>&1
              echo "megatron: $(summary "$out/megatron.log")" ;;
    bench) CUDA_VISIBLE_DEVICES=0 timeout 150 python3 tools/bench_train.py --lengths 32768 --variants flex \
             --out "$out/bench_train" >"$out/bench.log" 2>&1
           echo "bench:"; grep -E "^\{" "$out/bench.log" | tail -2 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
  echo "   ($(( $(date +%s) - t0 )) s so far)"
done
