// What the int8 CPU decode step's per-instruction-set kernels (decode_cpu_isa.h) and their driver
// (decode_cpu.cpp) share: plain argument records and the table of kernel entry points.
#pragma once

#include <cstdint>

namespace gpt2engine::cpu_decode {

// One int8 GEMV over packed weights (layout in decode_cpu_isa.h), with its epilogue.
struct GemvArgs {
  const int8_t* packed;    // ceil(n / 64) tiles of kp / 4 groups of 64 columns x 4 k
  const int32_t* colsum;   // (n,) each column's sum of int8 weights
  const float* wscale;     // (n,) per output channel
  const float* bias;       // (n,) or nullptr
  int64_t n, kp;           // output columns; k padded to a multiple of 4
  int64_t rows;
  const uint8_t* xq;       // (rows, kp) activation codes
  const float* xscale;     // (rows,)
  const int32_t* xzp;      // (rows,) zero points
  float* out;              // (rows, out_stride)
  int64_t out_stride;
  const float* residual;   // (rows, res_stride) added after the activation, may equal out; or nullptr
  int64_t res_stride;
  bool gelu;               // tanh GELU after the bias
};

// Decode attention of one layer for `rows` rows: store the new keys and values, attend over each
// row's [0, len).
struct AttentionArgs {
  const float* qkv;        // (rows, qkv_stride): queries, keys, values of this step, C each
  int64_t qkv_stride;
  float* k_cache;          // this layer's (slots, heads, max_len, head_dim)
  float* v_cache;
  const int32_t* lens;     // (rows,) lengths including the new token (stored at lens - 1)
  int64_t heads, head_dim, max_len;
  float* scores;           // (rows * heads, max_len) scratch
  float* out;              // (rows, out_stride)
  int64_t out_stride;
};

struct Kernels {
  // (x, x_stride, rows, k, kp, codes, scales, zero points)
  void (*quantize_rows)(const float*, int64_t, int64_t, int64_t, int64_t, uint8_t*, float*, int32_t*);
  // (x, x_stride, rows, c, weight, bias, eps, y, y_stride)
  void (*layer_norm_rows)(const float*, int64_t, int64_t, int64_t, const float*, const float*, float, float*,
                          int64_t);
  void (*gemv_tiles)(const GemvArgs&, int64_t tile_begin, int64_t tile_end);
  void (*attention_heads)(const AttentionArgs&, int64_t pair_begin, int64_t pair_end);  // (row, head) pairs
};

}  // namespace gpt2engine::cpu_decode
