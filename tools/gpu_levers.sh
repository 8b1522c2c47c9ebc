#!/usr/bin/env bash
# The training-throughput levers measured on 1 H200 (bench8b: 2). Parts: bench (tools/bench_train.py at the 1B shape, T=32K, every
# lever on and off, with a profile), losses (50 steps of the 125M config, plain path against every lever on, compared by
# tools/compare_losses.py), tests (the GPU tests of the compiled model), documents (document mode's flash tests and cost),
# loop (tools/bench_loop.py: the training loop against the bench), decode (the decoding GPU tests, the split-KV kernel's
# launch sweep, then bench_decode with the best launch, unfused and fused: no flash-attn-4 needed), attention (the
# kernels at head dim 64 and 128: segment flex and flash against causal FA2, cuDNN and flash-attn-4), train128k (the
# 1B recipe's levers at 32K and 128K). JSON, plots and logs.tar.gz go to $OUT.
# flash-attn-4 travels in three chained calls. Here: ../shared/gpu/wheels.sh fa4 fills .fa4a/ and .fa4b/ (56 + 42 MiB:
# .fa4a with the working tree, 9 MiB by now, passes the 64 MiB one call carries), then `tools/gpu_levers.sh split`
# re-cuts them into .fx1/ .. .fx3/ (at most 50 MiB each). On the host, back to back (it keeps /tmp about 30 s):
#   1 (carry .fx1): mkdir -p /tmp/fa4 && cp .fx1/* /tmp/fa4/      2 (carry .fx2): cp .fx2/* /tmp/fa4/
#   3 (carry .fx3, .whl; .study_data for losses and loop): tools/gpu_levers.sh [parts]
# A call that follows at once finds the install in /tmp/site.
lib=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
if [ "${1:-}" = split ]; then
  set -e
  rm -rf .fx1 .fx2 .fx3 /tmp/fx && mkdir -p /tmp/fx .fx1 .fx2 .fx3
  cat .fa4a/part.aa .fa4b/part.ab >/tmp/fx/$lib
  (cd /tmp/fx && sha256sum $lib >lib.sha && split -b 40M -d $lib lib.part- && rm $lib)
  cp .fa4a/*.whl /tmp/fx/lib.part-00 .fx1/ && cp /tmp/fx/lib.part-01 .fx2/ && cp /tmp/fx/lib.part-02 /tmp/fx/lib.sha .fx3/
  for d in .fx1 .fx2 .fx3; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >>.git/info/exclude; done
  rm -rf /tmp/fx; du -sh .fx?; exit 0
fi
set -u
out=${OUT:-runs/gpu_levers}
mkdir -p "$out"
if [ -d .fx3 ] && [ -f /tmp/fa4/lib.part-00 ]; then
  cp .fx3/* /tmp/fa4/
  (cd /tmp/fa4 && cat lib.part-0* >$lib && sha256sum -c lib.sha && rm lib.part-0*) \
    || echo "flash-attn-4: the joined wheel does not match its sha256 (were .fx1 and .fx2 copied at once before?)"
fi
# .whl first (a call before flash-attn-4 has arrived needs it too), flash-attn-4 once its wheel is whole
[ -f /tmp/site/.base ] || { python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/tmp/pip.log 2>&1 \
  && touch /tmp/site/.base; }
if [ -f /tmp/fa4/$lib ] && [ ! -f /tmp/site/.fa4 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/fa4/*.whl >>/tmp/pip.log 2>&1 && touch /tmp/site/.fa4
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
python3 -c "import flash_attn.cute; print('flash-attn-4: ok')" || echo "flash-attn-4: missing (flash variants fail)"
t0=$(date +%s)
logs=/tmp/gpu_levers_logs
mkdir -p $logs
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(bench losses tests)
for part in "${parts[@]}"; do
  case $part in
    bench)
      variants=${VARIANTS:-causal flex flash+compile flash+compile+fl flash+compile+ka16+off+fl}
      timeout "${BENCH_S:-500}" python3 tools/bench_train.py --lengths 32768 --variants $variants --profile --steps 4 \
        ${BENCH_ARGS:-} --out "$out" >$logs/bench.log 2>&1
      echo "bench ($(($(date +%s) - t0)) s):"; sed -n '/^| T | variant | S/,$p' $logs/bench.log
      grep -E "Error|error:" $logs/bench.log | tail -3 ;;
    bench8b)  # the Llama-3-8B shape on two GPUs: the megatron model, TP=2, flash segment attention
      timeout "${BENCH8B_S:-400}" torchrun --nproc-per-node 2 tools/bench_train.py --shape configs/model/llama3-8b.yaml \
        --lengths 32768 --megatron --megatron-backend flash --variants --steps 4 --out "$out/8b" >$logs/bench8b.log 2>&1
      echo "bench 8B ($(($(date +%s) - t0)) s):"; sed -n '/^| T | variant | S/,$p' $logs/bench8b.log
      grep -E "Error|error:" $logs/bench8b.log | tail -3 ;;
    losses)
      common=(--config configs/train/125m-16k.yaml --set steps=50 --set log_every=1 --set grad_accum=1
        --set save_every=1000 --set export_final=false --set optim.warmup_steps=10 --set model.vocab_size=8192
        --set 'data.prefixes=[.study_data/train]' --set data.tokenizer=.study_data/tokenizer/tokenizer.model
        --no-progress --overwrite)
      timeout 200 python3 -m segtrain train "${common[@]}" --set out_dir=/tmp/plain --set portable.compile=false \
        --set portable.fused_loss=false --set model.attention_backend=flex >$logs/train_plain.log 2>&1
      timeout 250 python3 -m segtrain train "${common[@]}" --set out_dir=/tmp/levers ${LEVERS:-} >$logs/train_levers.log 2>&1
      cp /tmp/plain/metrics.jsonl $logs/metrics_plain.jsonl; cp /tmp/levers/metrics.jsonl $logs/metrics_levers.jsonl
      echo "125M, 50 steps ($(($(date +%s) - t0)) s):"
      python3 tools/compare_losses.py /tmp/plain /tmp/levers --labels "plain (flex, eager)" \
        "levers (auto: flash, compile, fused loss; ${LEVERS:-})" --out "$out" || tail -n 3 $logs/train_plain.log $logs/train_levers.log ;;
    tests)
      timeout "${TESTS_S:-200}" python3 -m pytest -q -s -m gpu tests/test_compile.py tests/test_activation_offload.py \
        tests/test_fused_loss.py >$logs/tests.log 2>&1
      echo "gpu tests ($(($(date +%s) - t0)) s): $(grep -E "passed|failed|error" $logs/tests.log | tail -1)" ;;
    documents)  # document mode on flash-attn-4 (tests) and its cost against one stream, flex and flash (issue 32)
      # flash-attn-4 compiles its kernels on first use: 170 s was too little on an H100 (2026-12-06)
      timeout "${TESTS_S:-300}" python3 -m pytest -q -m gpu tests/test_documents_gpu.py >$logs/documents_tests.log 2>&1
      echo "document tests ($(($(date +%s) - t0)) s): $(grep -E "passed|failed|error" $logs/documents_tests.log | tail -1)"
      timeout "${BENCH_S:-300}" python3 tools/bench_documents.py --backends flex flash --snapshot --out "$out/documents" \
        >$logs/documents_bench.log 2>&1
      tail -n 6 $logs/documents_bench.log ;;
    loop)  # segtrain train with the 1B 32K recipe against the bench's bare step (issue 34), on .study_data's tokens
      timeout "${LOOP_S:-400}" python3 tools/bench_loop.py --config configs/train/llama3.2-1b-32k.yaml --steps 4 \
        --set 'data.prefixes=[.study_data/train]' --set data.tokenizer=.study_data/tokenizer/tokenizer.model \
        --out "$out/loop" >$logs/loop.log 2>&1
      echo "loop ($(($(date +%s) - t0)) s):"; tail -n 10 $logs/loop.log ;;
    decode)  # issue 34's decoding goals; runs before flash-attn-4 is whole (call 1 or 2 of the chain)
      timeout "${TESTS_S:-200}" python3 -m pytest -q -m gpu tests/test_kernels_decode.py tests/test_fused_projections.py \
        tests/test_inference_memory.py tests/test_inference_gpu.py >$logs/decode_tests.log 2>&1
      echo "decode GPU tests ($(($(date +%s) - t0)) s): $(grep -E "passed|failed|error" $logs/decode_tests.log | tail -1)"
      timeout "${TUNE_S:-200}" python3 tools/tune_decode_attention.py --budget-s 150 ${TUNE_ARGS:-} --out "$out/tune" \
        >$logs/tune.log 2>&1
      grep -E "^SEGTRAIN_DECODE_KERNEL=" $logs/tune.log | tail -1 >/tmp/decode_kernel.env
      echo "launch sweep ($(($(date +%s) - t0)) s):"; grep -E "^\| .*\(default\)|: bound|^best" $logs/tune.log ;;
    decode_bench)  # the engine end to end, the sweep's best launch (from a decode part just before), unfused and fused
      [ -s /tmp/decode_kernel.env ] && export "$(cat /tmp/decode_kernel.env)"
      echo "decode kernel: ${SEGTRAIN_DECODE_KERNEL:-default}"
      timeout "${DECODE_S:-480}" python3 tools/bench_decode.py --quick --fuse ${FUSE:-both} ${DECODE_ARGS:-} \
        --budget-s "${DECODE_BUDGET_S:-380}" --out "$out/decode" >$logs/decode_bench.log 2>&1
      echo "decode bench ($(($(date +%s) - t0)) s):"; sed -n '/^| case/,$p' $logs/decode_bench.log ;;
    attention)  # FA4's head-dim-64 backward against the other kernels here (issue 34)
      for dim in 64 128; do
        timeout 240 python3 tools/bench_attention.py --lengths 32768 --segments 4096 --fractions 0.25 --heads 32 \
          --kv-heads 8 --dim $dim --backends flex flash --dense cudnn fa4 --out "$out/attention_d$dim" \
          >$logs/attention_d$dim.log 2>&1
        echo "attention, head dim $dim ($(($(date +%s) - t0)) s):"; sed -n '/^| T | S/,$p' $logs/attention_d$dim.log
      done ;;
    train128k)  # the 1B recipe's levers at 32K and 128K, one process each (issue 34)
      timeout "${T128_S:-420}" python3 tools/bench_train.py --lengths 32768 131072 --isolate --steps 3 \
        --variants ${VARIANTS:-flash+compile+ka16+off+fl} --profile --out "$out/train128k" >$logs/train128k.log 2>&1
      echo "train 32K/128K ($(($(date +%s) - t0)) s):"; sed -n '/^| T | variant | S/,$p' $logs/train128k.log
      grep -E "Error|error:" $logs/train128k.log | tail -3 ;;
    install) ;;  # flash-attn-4 and .whl into /tmp/site, nothing run: a later call at once finds them there
    *) echo "unknown part $part (install, bench, bench8b, losses, tests, documents, loop, decode, decode_bench, attention,"\
         "train128k)"; exit 2 ;;
  esac
done
tar czf "$out/logs.tar.gz" -C $logs .
