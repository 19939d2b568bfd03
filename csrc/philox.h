// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
// One uniform double per (seed, offset): the same numbers on CPU, on GPU and in the Python
// reference (gpt2kernels/sampling.py), so every implementation draws the same token from the same input.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define GPT2E_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GPT2E_HOST_DEVICE inline
#endif

namespace gpt2engine {

GPT2E_HOST_DEVICE void philox_round(uint32_t c[4], const uint32_t k[2]) {
  const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
  const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  const uint32_t c1 = c[1], c3 = c[3];
  c[0] = hi1 ^ c1 ^ k[0];
  c[1] = lo1;
  c[2] = hi0 ^ c3 ^ k[1];
  c[3] = lo0;
}

// Uniform in [0, 1) with 53 random bits. Key = seed (a row's request seed); counter = (offset, 0),
// offset being the index of the drawn token within its request.
GPT2E_HOST_DEVICE double philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c[4] = {static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u};
  uint32_t k[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  for (int i = 0; i < 10; ++i) {
    philox_round(c, k);
    k[0] += 0x9E3779B9u;
    k[1] += 0xBB67AE85u;
  }
  const uint64_t bits = (static_cast<uint64_t>(c[0] >> 5) << 26) | static_cast<uint64_t>(c[1] >> 6);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);  // / 2^53
}

}  // namespace gpt2engine
