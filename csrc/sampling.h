// What the CPU and CUDA samplers share, both defined in sampling_cpu.cpp (linked into one library).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace gpt2engine {

// sample_next_'s checks of offset and out: contiguous int64 (B,) tensors on the logits' device.
void check_sample_next_outputs(const at::Tensor& logits, const at::Tensor& offset, const at::Tensor& out);

// The per-row parameters in the dtypes both samplers read, contiguous, each checked to hold `rows`
// values (as `out` must); with `advance`, `offset` itself, which the sampler then increments.
struct RowTensors {
  at::Tensor temperature, top_k, top_p, min_p, seed, offset;
};
RowTensors row_tensors(int64_t rows, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                       const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out,
                       bool advance);

}  // namespace gpt2engine
