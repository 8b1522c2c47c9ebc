#!/usr/bin/env bash
# Transformer Engine on the GPU host, then its GPU tests and an attention benchmark; logs and JSON go to $OUT.
# Here: ../shared/gpu/te.sh fills .te1/ .. .te5/ (61 MiB folders: with the working tree they pass the 64 MiB one call
# carries), then `tools/gpu_te.sh split` re-cuts them into .tx1/ .. .tx6/ (50 MiB). On the host, six calls back to
# back (it keeps /tmp about 30 s):
#   1 (carry .tx1): mkdir -p /tmp/te && cp .tx1/* /tmp/te/      2-5 (carry .txN): cp .txN/* /tmp/te/
#   6 (carry .tx6 and .whl; .study_data for losses): tools/gpu_te.sh [tests] [bench] [losses]
# losses: the 125M config (megatron model, TE layers) trained STEPS steps in BF16 and with fp8 defaults, compared by
# tools/compare_losses.py (plot and JSON under $OUT/fp8_losses).
if [ "${1:-}" = split ]; then
  set -e
  rm -rf .tx1 .tx2 .tx3 .tx4 .tx5 .tx6 /tmp/tx && mkdir -p /tmp/tx
  cat .te1/cu13.part-00 .te2/cu13.part-01 .te3/cu13.part-02 .te4/cu13.part-03 .te5/cu13.part-04 >/tmp/tx/core
  (cd /tmp/tx && split -b 50M -d core cu13.part- && rm core)
  for i in 0 1 2 3 4; do mkdir -p .tx$((i + 1)) && mv /tmp/tx/cu13.part-0$i .tx$((i + 1))/; done
  mkdir -p .tx6 && mv /tmp/tx/cu13.part-05 .tx6/ && cp .te5/cu13.sha .te5/*.whl .tx6/
  for d in .tx1 .tx2 .tx3 .tx4 .tx5 .tx6; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >>.git/info/exclude; done
  du -sh .tx?; exit 0
fi
set -u
out=${OUT:-runs/gpu_te}
mkdir -p "$out"
if [ -d .tx6 ] && [ -f /tmp/te/cu13.part-00 ]; then
  cp .tx6/* /tmp/te/
  (cd /tmp/te && cat cu13.part-0* >transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl && sha256sum -c cu13.sha \
    && rm cu13.part-0*) || echo "transformer-engine: the joined wheel does not match its sha256"
fi
[ -d /tmp/site/transformer_engine ] || python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site \
  /tmp/te/*.whl .whl/*.whl >/tmp/pip_te.log 2>&1 || tail -3 /tmp/pip_te.log
N=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
# the host's system cuDNN is older than torch's: TE must load torch's (te.sh's header says why)
export PYTHONPATH=/tmp/site:$PWD CUDNN_HOME=$N/cudnn LD_LIBRARY_PATH=$N/cudnn/lib:$N/cu13/lib:${LD_LIBRARY_PATH:-} PYTHONUNBUFFERED=1
python3 -c "import torch, transformer_engine.pytorch; print('transformer-engine: ok')" 2>&1 | tail -1
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests bench)
for part in "${parts[@]}"; do
  case $part in
    tests)
      timeout "${TESTS_S:-300}" python3 -m pytest -q -m gpu -x tests/test_attention_te.py tests/test_megatron_te_gpu.py \
        >"$out/tests_te.log" 2>&1
      echo "te tests: $(grep -E "passed|failed|error" "$out/tests_te.log" | tail -1)"
      grep -E "^(FAILED|ERROR|E  )" "$out/tests_te.log" | head -12 ;;
    bench)
      timeout "${BENCH_S:-200}" python3 tools/bench_attention.py --lengths 32768 --segments 4096 --fractions 0.25 \
        --backends te te-fp8 flex --te-causal --out "$out" >"$out/bench_te.log" 2>&1
      sed -n '/^| T /,$p' "$out/bench_te.log" | head -20; grep -E "failed" "$out/bench_te.log" | head -3 ;;
    losses)
      common=(--config configs/train/125m-16k.yaml --set model_impl=megatron --set "steps=${STEPS:-200}" --set log_every=5
        --set grad_accum=1 --set save_every=100000 --set export_final=false --set optim.warmup_steps=20
        --set model.vocab_size=8192 --set 'data.prefixes=[.study_data/train]'
        --set data.tokenizer=.study_data/tokenizer/tokenizer.model --no-progress --overwrite)
      timeout "${LOSS_S:-240}" python3 -m segtrain train "${common[@]}" --set out_dir=/tmp/te_bf16 >"$out/train_bf16.log" 2>&1
      timeout "${LOSS_S:-240}" python3 -m segtrain train "${common[@]}" --set out_dir=/tmp/te_fp8 --set 'megatron.fp8={}' \
        >"$out/train_fp8.log" 2>&1
      python3 tools/compare_losses.py /tmp/te_bf16 /tmp/te_fp8 --labels "megatron + TE, BF16" "megatron + TE, FP8" \
        --out "$out/fp8_losses" || tail -n 3 "$out/train_bf16.log" "$out/train_fp8.log" ;;
    *) echo "unknown part $part (tests, bench, losses)"; exit 2 ;;
  esac
done
