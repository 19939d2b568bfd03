#!/usr/bin/env bash
# Compile-check csrc/sampling_cuda.cu for sm_90 without a GPU: nvcc against the headers of CUDA builds
# of torch, each installed without its dependencies into a side venv (never imported). Two builds:
#   torch 2.11.0, -std=c++17: what the GPU machine has and builds the extension with;
#   torch 2.14.1, -std=c++20: the newest torch pip takes here (its headers demand C++20).
# -Xptxas -v prints registers and spills per kernel. Both compiles run in parallel (~70 s each on 2 cores).
#   csrc/check_cuda_build.sh [TORCH_VERSION:STD ...]    (default: 2.11.0:17 2.14.1:20)
set -euo pipefail
cd "$(dirname "$0")/.."
PYINC=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')

check() {  # check TORCH_VERSION STD: prints the ptxas report and OK, or FAILED and returns 1
  local version=$1 std=$2 venv=/tmp/cuda-headers-$1 obj=/tmp/sampling_cuda-$1.o
  if [ ! -d "$venv/lib" ] || ! ls "$venv"/lib/python3*/site-packages/torch/include >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "torch==$version"
  fi
  local T
  T=$(echo "$venv"/lib/python3*/site-packages/torch/include)
  rm -f "$obj"
  # The flags torch.utils.cpp_extension passes to nvcc, so the check sees what a real build sees.
  nvcc -std=c++$std -arch=sm_90 -O3 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -I"$T" -I"$T/torch/csrc/api/include" -I"$PYINC" -Icsrc \
       -DTORCH_EXTENSION_NAME=gpt2engine_C -c csrc/sampling_cuda.cu -o "$obj" -Xptxas -v 2>&1 \
    | grep -E "error|warning|registers|spill|Compiling entry" || true
  if [ -s "$obj" ]; then echo "nvcc compile check (torch $version, C++$std, sm_90): OK"
  else echo "nvcc compile check (torch $version, C++$std, sm_90): FAILED"; return 1; fi
}

specs=("$@")
[ $# -gt 0 ] || specs=(2.11.0:17 2.14.1:20)
pids=()
for spec in "${specs[@]}"; do
  check "${spec%%:*}" "${spec##*:}" > "/tmp/check_cuda_build-${spec%%:*}.log" 2>&1 &
  pids+=("$!")
done
status=0
for i in "${!specs[@]}"; do
  wait "${pids[$i]}" || status=1
  cat "/tmp/check_cuda_build-${specs[$i]%%:*}.log"
done
exit $status
