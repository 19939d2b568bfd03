// The int8 decode step's kernels for one instruction set. decode_cpu.cpp includes this file three
// times, each inside `#pragma GCC target(...)` and with GPT2_ISA set (2: AVX-512 VNNI, 1: AVX2,
// 0: portable C++), into a namespace of its own; it then calls the one the processor supports.
//
// Nothing here may instantiate a template shared with other translation units (std::, ATen): the
// linker keeps one copy of such an instantiation, and the AVX-512 one would run on every processor.
// Everything is raw pointers and functions with internal linkage.
//
// Packed int8 weights: a (N, K) matrix as ceil(N / 64) tiles of 64 output columns; a tile holds
// ceil(K / 4) groups of (64 columns x 4 consecutive k) bytes, so one 64-byte load is 16 columns x
// 4 k, what one vpdpbusd multiplies, and a thread streams one contiguous run of tiles. Padding
// columns and k are zero. Activations are quantised per row to uint8 with a zero point (fbgemm's
// dynamic scheme, one scale per row rather than per call):
//   y[n] = (sum_k xq[k] w[n, k] - zp * colsum[n]) * x_scale * w_scale[n] + bias[n].

namespace GPT2_ISA_NS {
namespace {

using i8 = int8_t;
using u8 = uint8_t;
using i32 = int32_t;
using i64 = int64_t;
using ::gpt2engine::cpu_decode::AttentionArgs;
using ::gpt2engine::cpu_decode::GemvArgs;

#define GPT2_INLINE inline __attribute__((always_inline))

GPT2_INLINE float fmax_(float a, float b) { return a > b ? a : b; }
GPT2_INLINE float fmin_(float a, float b) { return a < b ? a : b; }

// e^x, branch-free so that loops over it vectorise: 2^n by the exponent bits and a degree-6
// Taylor polynomial on |r| <= ln2 / 2 (relative error ~2e-7, a float's rounding).
GPT2_INLINE float exp_(float x) {
  x = fmin_(fmax_(x, -87.0f), 88.0f);
  const float t = x * 1.44269504f;
  const float n = static_cast<float>(static_cast<i32>(t + 128.5f)) - 128.0f;  // round(t), t >= -126
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;                // x - n ln2 in two parts
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i32 bits = (static_cast<i32>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return p * scale;
}

// gelu with the tanh approximation: 0.5 y (1 + tanh(u)) = y / (1 + e^(-2u)), u = sqrt(2/pi) (y + 0.044715 y^3).
GPT2_INLINE float gelu_tanh_(float y) {
  const float u = 0.7978845608f * (y + 0.044715f * y * y * y);
  return y / (1.0f + exp_(-2.0f * u));
}

// Each row of x (rows, k) -> uint8 codes (row stride kp, padded with the zero point), scale and
// zero point: scale = (max - min) / 255 over the row and 0, q = round(x / scale) + zp in [0, 255].
void quantize_rows(const float* x, i64 x_stride, i64 rows, i64 k, i64 kp, u8* xq, float* scale, i32* zp) {
  for (i64 r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    float lo = 0.0f, hi = 0.0f;
    for (i64 i = 0; i < k; ++i) {
      lo = fmin_(lo, xr[i]);
      hi = fmax_(hi, xr[i]);
    }
    float s = (hi - lo) / 255.0f;
    if (!(s > 0.0f)) s = 1.0f;  // an all-zero row (or NaN): any scale codes it as the zero point
    const float inv = 1.0f / s;
    const i32 z = static_cast<i32>(__builtin_nearbyintf(-lo * inv));
    u8* q = xq + r * kp;
    for (i64 i = 0; i < k; ++i) {
      const float v = fmin_(fmax_(__builtin_nearbyintf(xr[i] * inv) + static_cast<float>(z), 0.0f), 255.0f);
      q[i] = static_cast<u8>(static_cast<i32>(v));
    }
    for (i64 i = k; i < kp; ++i) q[i] = static_cast<u8>(z);
    scale[r] = s;
    zp[r] = z;
  }
}

// LayerNorm of each row of x (rows, c) into y, in fp32: (x - mean) / sqrt(var + eps) * w + b.
void layer_norm_rows(const float* x, i64 x_stride, i64 rows, i64 c, const float* w, const float* b, float eps,
                     float* y, i64 y_stride) {
  for (i64 r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    float* yr = y + r * y_stride;
    float part[16] = {0};
    i64 i = 0;
    for (; i + 16 <= c; i += 16)
      for (int j = 0; j < 16; ++j) part[j] += xr[i + j];
    float sum = 0.0f;
    for (; i < c; ++i) sum += xr[i];
    for (int j = 0; j < 16; ++j) sum += part[j];
    const float mean = sum / static_cast<float>(c);
    float vpart[16] = {0};
    i = 0;
    for (; i + 16 <= c; i += 16)
      for (int j = 0; j < 16; ++j) {
        const float d = xr[i + j] - mean;
        vpart[j] += d * d;
      }
    float var = 0.0f;
    for (; i < c; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    for (int j = 0; j < 16; ++j) var += vpart[j];
    const float rstd = 1.0f / __builtin_sqrtf(var / static_cast<float>(c) + eps);
    for (i = 0; i < c; ++i) yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
  }
}


// acc (up to 4 rows x 64 columns of int32 dot products) -> out, for the tile's columns [n0, n0 + 64).
// Loops without branches inside, so that each vectorises (the GELU's exp too).
void epilogue(const GemvArgs& a, i64 r0, int nrows, i64 n0, const i32 (*acc)[64]) {
  const i64 ncols = a.n - n0 < 64 ? a.n - n0 : 64;
  alignas(64) float v[64];
  for (int r = 0; r < nrows; ++r) {
    const float xs = a.xscale[r0 + r];
    const i32 z = a.xzp[r0 + r];
    const i32* cs = a.colsum + n0;
    const float* ws = a.wscale + n0;
    for (i64 j = 0; j < ncols; ++j) v[j] = static_cast<float>(acc[r][j] - z * cs[j]) * (xs * ws[j]);
    if (a.bias)
      for (i64 j = 0; j < ncols; ++j) v[j] += a.bias[n0 + j];
    if (a.gelu)
      for (i64 j = 0; j < ncols; ++j) v[j] = gelu_tanh_(v[j]);
    if (a.residual) {
      const float* res = a.residual + (r0 + r) * a.res_stride + n0;
      for (i64 j = 0; j < ncols; ++j) v[j] += res[j];
    }
    float* o = a.out + (r0 + r) * a.out_stride + n0;
    for (i64 j = 0; j < ncols; ++j) o[j] = v[j];
  }
}

#if GPT2_ISA == 2
// AVX-512 VNNI: per group of 4 k, one broadcast of each row's 4 codes and one vpdpbusd per 16 columns.
template <int R>
GPT2_INLINE void tile_rows(const GemvArgs& a, i64 tile, i64 r0, i32 (*acc)[64]) {
  __m512i s[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) s[r][j] = _mm512_setzero_si512();
  const i64 groups = a.kp / 4;
  const i8* w = a.packed + tile * groups * 256;
  const i32* x[R];
  for (int r = 0; r < R; ++r) x[r] = reinterpret_cast<const i32*>(a.xq + (r0 + r) * a.kp);
  for (i64 g = 0; g < groups; ++g, w += 256) {
    const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
    const __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
    for (int r = 0; r < R; ++r) {
      const __m512i xb = _mm512_set1_epi32(x[r][g]);
      s[r][0] = _mm512_dpbusd_epi32(s[r][0], xb, w0);
      s[r][1] = _mm512_dpbusd_epi32(s[r][1], xb, w1);
      s[r][2] = _mm512_dpbusd_epi32(s[r][2], xb, w2);
      s[r][3] = _mm512_dpbusd_epi32(s[r][3], xb, w3);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_si512(acc[r] + 16 * j, s[r][j]);
}

void gemv_tiles(const GemvArgs& a, i64 t0, i64 t1) {
  alignas(64) i32 acc[4][64];
  for (i64 t = t0; t < t1; ++t) {
    for (i64 r0 = 0; r0 < a.rows; r0 += 4) {  // 4 rows: 16 accumulators of the 32 registers
      const int nr = a.rows - r0 < 4 ? static_cast<int>(a.rows - r0) : 4;
      switch (nr) {
        case 1: tile_rows<1>(a, t, r0, acc); break;
        case 2: tile_rows<2>(a, t, r0, acc); break;
        case 3: tile_rows<3>(a, t, r0, acc); break;
        default: tile_rows<4>(a, t, r0, acc); break;
      }
      epilogue(a, r0, nr, t * 64, acc);
    }
  }
}
#else
#if GPT2_ISA == 1
// AVX2: 16 weights (4 columns x 4 k) widened to int16 and multiplied by the row's 4 codes with
// vpmaddwd, which sums pairs into int32 without saturating (255 x 128 x 2 < 2^31), so the two
// partial sums of each column are added at the end. Half a tile (32 columns, 8 accumulators) at a time.
GPT2_INLINE void tile_row(const i8* tile, i64 groups, const u8* xr, i32* acc) {
  alignas(32) i32 part[64][2];
  for (int half = 0; half < 2; ++half) {
    __m256i s[8];
    for (int j = 0; j < 8; ++j) s[j] = _mm256_setzero_si256();
    const i8* w = tile + half * 128;
    for (i64 g = 0; g < groups; ++g, w += 256) {
      const i64 codes = static_cast<i64>(xr[4 * g]) | static_cast<i64>(xr[4 * g + 1]) << 16 |
                        static_cast<i64>(xr[4 * g + 2]) << 32 | static_cast<i64>(xr[4 * g + 3]) << 48;
      const __m256i xb = _mm256_set1_epi64x(codes);
      for (int j = 0; j < 8; ++j) {
        const __m256i wj = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * j)));
        s[j] = _mm256_add_epi32(s[j], _mm256_madd_epi16(wj, xb));
      }
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(part[half * 32 + 4 * j]), s[j]);
  }
  for (int j = 0; j < 64; ++j) acc[j] = part[j][0] + part[j][1];
}
#else
// Portable: the same products in plain loops.
GPT2_INLINE void tile_row(const i8* tile, i64 groups, const u8* xr, i32* acc) {
  for (int j = 0; j < 64; ++j) acc[j] = 0;
  const i8* w = tile;
  for (i64 g = 0; g < groups; ++g, w += 256)
    for (int j = 0; j < 64; ++j)
      for (int q = 0; q < 4; ++q) acc[j] += static_cast<i32>(xr[4 * g + q]) * w[4 * j + q];
}
#endif

// One row at a time: each tile's 64 dot products of the row, then the epilogue.
void gemv_tiles(const GemvArgs& a, i64 t0, i64 t1) {
  alignas(64) i32 acc[1][64];
  const i64 groups = a.kp / 4;
  for (i64 t = t0; t < t1; ++t)
    for (i64 r = 0; r < a.rows; ++r) {
      tile_row(a.packed + t * groups * 256, groups, a.xq + r * a.kp, acc[0]);
      epilogue(a, r, 1, t * 64, acc);
    }
}
#endif


// 16 floats in one vector of the build's width (a zmm; two ymm; four xmm), unaligned loads and stores.
typedef float v16f __attribute__((vector_size(64)));

GPT2_INLINE v16f load16_(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, 64);
  return v;
}

GPT2_INLINE void store16_(float* p, v16f v) { __builtin_memcpy(p, &v, 64); }

typedef int32_t v16i __attribute__((vector_size(64)));

// The sum of the 16 lanes, by halves (4 shuffles and adds rather than 15 dependent adds).
GPT2_INLINE float sum16_(v16f v) {
  v += __builtin_shuffle(v, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, v16i{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, v16i{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, v16i{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

GPT2_INLINE float dot_(const float* a, const float* b, i64 n) {
  v16f acc = {};
  i64 j = 0;
  for (; j + 16 <= n; j += 16) acc += load16_(a + j) * load16_(b + j);
  float s = sum16_(acc);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// o += p * v over n values
GPT2_INLINE void axpy_(float* o, float p, const float* v, i64 n) {
  i64 j = 0;
  for (; j + 16 <= n; j += 16) store16_(o + j, load16_(o + j) + p * load16_(v + j));
  for (; j < n; ++j) o[j] += p * v[j];
}

// One (row, head) with head_dim 16 * V (GPT-2's 64 at every size: V = 4): scores of q against
// keys [0, len), softmax, the weighted sum of values into o. q lives in registers, scaled once.
template <int V>
GPT2_INLINE void attend_fixed(const float* q, const float* kb, const float* vb, i64 len, float scale, float* s,
                              float* o) {
  constexpr int D = 16 * V;
  v16f qv[V], acc[V];
  for (int j = 0; j < V; ++j) qv[j] = load16_(q + 16 * j) * scale;
  float best = -3.0e38f;
  for (i64 t = 0; t < len; ++t) {
    const float* k = kb + t * D;
    v16f dot = qv[0] * load16_(k);
    for (int j = 1; j < V; ++j) dot += qv[j] * load16_(k + 16 * j);
    s[t] = sum16_(dot);
    best = fmax_(best, s[t]);
  }
  float total = 0.0f;
  for (i64 t = 0; t < len; ++t) {
    s[t] = exp_(s[t] - best);
    total += s[t];
  }
  for (int j = 0; j < V; ++j) acc[j] = v16f{};
  for (i64 t = 0; t < len; ++t)
    for (int j = 0; j < V; ++j) acc[j] += s[t] * load16_(vb + t * D + 16 * j);
  const float inv = 1.0f / total;
  for (int j = 0; j < V; ++j) store16_(o + 16 * j, acc[j] * inv);
}

// Any head_dim: the same passes over runtime-length rows.
GPT2_INLINE void attend_any(const float* q, const float* kb, const float* vb, i64 len, i64 d, float scale, float* s,
                            float* o) {
  float best = -3.0e38f;
  for (i64 t = 0; t < len; ++t) {
    s[t] = dot_(q, kb + t * d, d) * scale;
    best = fmax_(best, s[t]);
  }
  for (i64 t = 0; t < len; ++t) s[t] = exp_(s[t] - best);
  float total = 0.0f;
  for (i64 t = 0; t < len; ++t) total += s[t];
  for (i64 j = 0; j < d; ++j) o[j] = 0.0f;
  for (i64 t = 0; t < len; ++t) axpy_(o, s[t], vb + t * d, d);
  const float inv = 1.0f / total;
  for (i64 j = 0; j < d; ++j) o[j] *= inv;
}

// Stores each (row, head)'s new key and value at its last position, then attends over [0, len).
void attention_heads(const AttentionArgs& a, i64 i0, i64 i1) {
  const i64 d = a.head_dim, c = a.heads * d;
  const float scale = 1.0f / __builtin_sqrtf(static_cast<float>(d));
  for (i64 i = i0; i < i1; ++i) {
    const i64 row = i / a.heads, h = i % a.heads, len = a.lens[row];
    const float* q = a.qkv + row * a.qkv_stride + h * d;
    float* kb = a.k_cache + (row * a.heads + h) * a.max_len * d;
    float* vb = a.v_cache + (row * a.heads + h) * a.max_len * d;
    __builtin_memcpy(kb + (len - 1) * d, q + c, d * sizeof(float));
    __builtin_memcpy(vb + (len - 1) * d, q + 2 * c, d * sizeof(float));
    float* s = a.scores + i * a.max_len;
    float* o = a.out + row * a.out_stride + h * d;
    if (d == 64)
      attend_fixed<4>(q, kb, vb, len, scale, s, o);
    else
      attend_any(q, kb, vb, len, d, scale, s, o);
  }
}

}  // namespace


const ::gpt2engine::cpu_decode::Kernels kernels = {quantize_rows, layer_norm_rows, gemv_tiles, attention_heads};

#undef GPT2_INLINE

}  // namespace GPT2_ISA_NS
