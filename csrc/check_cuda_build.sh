#!/usr/bin/env bash
# Compile-check csrc/sampling_cuda.cu for sm_90 without a GPU: nvcc against the headers of a CUDA
# build of torch, installed without its dependencies into a side venv (it is never imported).
# -Xptxas -v prints registers and spills per kernel. The code must be valid C++17 (torch 2.11 on the
# GPU machine builds with it) and C++20; torch 2.14's headers themselves demand C++20, so this checks
# the standard given as $1 (default 20) and the C++17 side rests on using no C++20 feature.
set -euo pipefail
cd "$(dirname "$0")/.."
STD=${1:-20}
VENV=${CUDA_HEADERS_VENV:-/tmp/cuda-headers}
if [ ! -d "$VENV/lib" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-deps torch==2.14.1
fi
T=$(echo "$VENV"/lib/python3*/site-packages/torch/include)
PYINC=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
rm -f /tmp/sampling_cuda.o
# The flags torch.utils.cpp_extension passes to nvcc, so the check sees what a real build sees.
nvcc -std=c++$STD -arch=sm_90 -O3 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
     -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -I"$T" -I"$T/torch/csrc/api/include" -I"$PYINC" -Icsrc \
     -DTORCH_EXTENSION_NAME=gpt2engine_C -c csrc/sampling_cuda.cu -o /tmp/sampling_cuda.o -Xptxas -v 2>&1 \
  | grep -E "error|warning|registers|spill|Compiling entry" || true
test -s /tmp/sampling_cuda.o || { echo "nvcc compile check (C++$STD, sm_90): FAILED"; exit 1; }
echo "nvcc compile check (C++$STD, sm_90): OK"
