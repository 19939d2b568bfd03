// Sampling on CUDA, sort-free: one thread block per row.
//
//   1. max / first-index argmax / NaN check (block reductions);
//   2. top-k: radix select of the k-th largest scaled logit (4 passes over 8-bit digits of an
//      order-preserving uint32 key, counting in shared memory);
//   3. top-p: the same radix descent, weighing each digit bin by its fixed-point probability mass
//      (integer atomics: the result does not depend on thread timing), finds the boundary value;
//      tokens tied at the boundary are kept in vocabulary order while the mass before them is < p;
//   4. min-p: a kept token also needs weight exp(scaled - top) >= min_p (checked where 5 walks);
//   5. the draw: inverse CDF over the kept tokens in vocabulary order (a deterministic block scan
//      over contiguous per-thread segments; one owner segment chosen by a block reduction), with
//      the row's Philox uniform (philox.h).
// Semantics are those of gpt2kernels/sampling.py; each row's seed and offset are read on the device,
// so a captured CUDA graph replays fresh randomness when the caller advances the offset tensor.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <initializer_list>

#include "philox.h"
#include "sampling.h"

namespace gpt2engine {

namespace {

constexpr int kThreads = 512;
constexpr double kMassScale = 4503599627370496.0;  // 2^52: probabilities as exact-sum integers

// Order-preserving map of a float to uint32: a > b  <=>  key(a) > key(b).
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T>
__device__ __forceinline__ float load_logit(const T* row, int64_t stride, int64_t j) {
  return static_cast<float>(row[j * stride]);
}

struct MaxArg {
  float value;
  int64_t index;
  int nan;
};

struct MaxArgOp {
  __device__ MaxArg operator()(const MaxArg& a, const MaxArg& b) const {
    MaxArg out;
    out.nan = a.nan | b.nan;
    const bool take_b = b.value > a.value || (b.value == a.value && b.index < a.index);
    out.value = take_b ? b.value : a.value;
    out.index = take_b ? b.index : a.index;
    return out;
  }
};

struct MaxIndexOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

struct SampleShared {
  union {
    cub::BlockReduce<MaxArg, kThreads>::TempStorage maxarg;
    cub::BlockReduce<double, kThreads>::TempStorage sum;
    cub::BlockScan<double, kThreads>::TempStorage scan_d;
    cub::BlockScan<int, kThreads>::TempStorage scan_i;
    cub::BlockReduce<int64_t, kThreads>::TempStorage max_i;
  } cub;
  unsigned int count[256];
  unsigned long long mass[256];
  float best;
  int64_t argmax;
  int bad;
  uint32_t prefix;      // radix select: the digits fixed so far
  int remaining;        // top-k: rank still to find inside the current prefix
  unsigned long long above;  // top-p: fixed-point mass of keys above the current prefix
  int tied;             // top-p: how many boundary-tied tokens to keep
  double total;
  double target;
  int owner;            // the one thread whose segment holds the draw
  int64_t pick;
};

// Radix descent over the 32-bit keys of the tokens passing `in_set`. With WEIGH_MASS, bins carry
// probability mass and the descent stops at the bin where the mass from the top reaches `goal`;
// otherwise bins carry counts and it finds the `goal`-th largest key. Returns the key.
template <bool WEIGH_MASS, typename Scaled, typename Pred>
__device__ uint32_t radix_select(Scaled scaled, int64_t vocab, float top, double inv_total, unsigned long long goal,
                                 Pred in_set, SampleShared& sh) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.remaining = static_cast<int>(goal);
    sh.above = 0;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      sh.count[b] = 0;
      sh.mass[b] = 0;
    }
    __syncthreads();
    const uint32_t high_mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
    const uint32_t prefix = sh.prefix;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float s = scaled(j);
      const uint32_t key = float_key(s);
      if (!in_set(s) || (key & high_mask) != (prefix & high_mask)) continue;
      const uint32_t digit = (key >> shift) & 0xFFu;
      if (WEIGH_MASS) {
        const double p = exp(static_cast<double>(s) - top) * inv_total;
        atomicAdd(&sh.mass[digit], static_cast<unsigned long long>(p * kMassScale));
      }
      atomicAdd(&sh.count[digit], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int chosen = -1;
      for (int d = 255; d >= 0; --d) {
        if (sh.count[d] == 0) continue;
        chosen = d;
        if (WEIGH_MASS) {
          if (sh.above + sh.mass[d] >= goal) break;
          sh.above += sh.mass[d];
        } else {
          if (static_cast<int>(sh.count[d]) >= sh.remaining) break;
          sh.remaining -= static_cast<int>(sh.count[d]);
        }
      }
      // Rounding can leave the mass short of the goal: the last non-empty bin is then the boundary.
      if (WEIGH_MASS && chosen >= 0 && sh.above + sh.mass[chosen] < goal) sh.above -= sh.mass[chosen];
      sh.prefix |= static_cast<uint32_t>(chosen < 0 ? 0 : chosen) << shift;
      if (WEIGH_MASS && shift == 0 && chosen >= 0) {
        // Tokens tied at the boundary value: keep them in vocabulary order while the mass before < p.
        const unsigned long long each = sh.mass[chosen] / sh.count[chosen];
        int keep = 1;
        while (keep < static_cast<int>(sh.count[chosen]) && sh.above + each * keep < goal) ++keep;
        sh.tied = keep;
      }
    }
    __syncthreads();
  }
  return sh.prefix;
}

// Thread 0 stores the row's token and, for sample_next_, advances the row's offset (which only
// thread 0 read, earlier, for the row's uniform).
__device__ __forceinline__ void finish_row(int64_t* out, int64_t* offset, int64_t r, int64_t token, bool advance) {
  out[r] = token;
  if (advance) offset[r] += 1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(
    const T* __restrict__ logits, int64_t stride_row, int64_t stride_col, int64_t vocab,
    const float* __restrict__ temperature, const int64_t* __restrict__ top_k, const double* __restrict__ top_p,
    const double* __restrict__ min_p, const int64_t* __restrict__ seed, int64_t* __restrict__ offset,
    int64_t* __restrict__ out, bool advance) {
  __shared__ SampleShared sh;
  const int64_t r = blockIdx.x;
  const T* row = logits + r * stride_row;

  // 1. max, argmax (first index wins), NaN.
  MaxArg local{-INFINITY, INT64_MAX, 0};
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = load_logit(row, stride_col, j);
    if (isnan(v)) local.nan = 1;
    else if (v > local.value) { local.value = v; local.index = j; }
  }
  const MaxArg best = cub::BlockReduce<MaxArg, kThreads>(sh.cub.maxarg).Reduce(local, MaxArgOp());
  if (threadIdx.x == 0) {
    sh.best = best.value;
    sh.argmax = best.index;
    sh.bad = best.nan || best.value == -INFINITY;
  }
  __syncthreads();
  const float temp = temperature[r];
  const int64_t k = top_k[r];
  const double p = top_p[r];
  const double mp = min_p[r];
  // Greedy also where the top scaled logit is not finite (a +inf logit, or a temperature so small
  // that the division overflows), as in the reference.
  if (sh.bad || temp == 0.0f || k == 1 || !isfinite(sh.best / temp)) {
    if (threadIdx.x == 0) finish_row(out, offset, r, sh.bad ? -1 : sh.argmax, advance);
    return;
  }
  // Division, not multiplication by the inverse, so the scaled logits are bit-identical to the
  // reference's x / temperature.
  const float top = sh.best / temp;
  auto scaled = [=](int64_t j) { return load_logit(row, stride_col, j) / temp; };

  // 2. top-k threshold: the k-th largest scaled logit; ties at it are kept.
  float kth = -INFINITY;
  if (k > 0 && k < vocab) {
    const uint32_t key = radix_select<false>(scaled, vocab, top, 0.0, static_cast<unsigned long long>(k),
                                             [](float) { return true; }, sh);
    const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
    kth = __uint_as_float(bits);
  }

  // Mass of the top-k survivors (all tokens without top-k); a fixed-order block sum.
  double part = 0.0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float s = scaled(j);
    if (s >= kth) part += exp(static_cast<double>(s) - top);
  }
  const double total = cub::BlockReduce<double, kThreads>(sh.cub.sum).Sum(part);
  if (threadIdx.x == 0) sh.total = total;
  __syncthreads();

  // 3. top-p boundary: keys above `boundary` are kept, and the first `tied` tokens equal to it.
  uint32_t boundary = 0;
  int tied = INT32_MAX;
  if (p < 1.0) {
    boundary = radix_select<true>(scaled, vocab, top, 1.0 / sh.total, static_cast<unsigned long long>(p * kMassScale),
                                  [kth](float s) { return s >= kth; }, sh);
    tied = sh.tied;
  }

  // 4-5. Inverse CDF in vocabulary order over contiguous per-thread segments. A token is kept when
  // it survives top-k and lies above the top-p boundary, or is among its first `tied` ties, and
  // its weight reaches min_p.
  const int64_t seg = (vocab + blockDim.x - 1) / blockDim.x;
  const int64_t lo = min(vocab, static_cast<int64_t>(threadIdx.x) * seg), hi = min(vocab, lo + seg);
  int seg_ties = 0;
  if (p < 1.0) {
    for (int64_t j = lo; j < hi; ++j) {
      const float s = scaled(j);
      seg_ties += s >= kth && float_key(s) == boundary;
    }
  }
  int ties_before = 0;
  cub::BlockScan<int, kThreads>(sh.cub.scan_i).ExclusiveSum(seg_ties, ties_before);
  __syncthreads();
  auto kept = [&](float s, int& rank) {  // by top-k and top-p; the loops below apply min-p to the weight
    if (s < kth) return false;
    if (p >= 1.0) return true;
    const uint32_t key = float_key(s);
    if (key != boundary) return key > boundary;
    return rank++ < tied;
  };
  double seg_mass = 0.0;
  int64_t seg_last = -1;
  int rank = ties_before;
  for (int64_t j = lo; j < hi; ++j) {
    const float s = scaled(j);
    if (!kept(s, rank)) continue;
    const double w = exp(static_cast<double>(s) - top);
    if (w < mp) continue;
    seg_mass += w;
    if (w > 0) seg_last = j;
  }
  double mass_before = 0.0;
  double kept_total = 0.0;
  cub::BlockScan<double, kThreads>(sh.cub.scan_d).ExclusiveSum(seg_mass, mass_before, kept_total);
  __syncthreads();
  const int64_t last = cub::BlockReduce<int64_t, kThreads>(sh.cub.max_i).Reduce(seg_last, MaxIndexOp());
  if (threadIdx.x == 0) {
    sh.pick = last;  // where rounding leaves the target past the end
    sh.owner = -1;
    sh.target = philox_uniform(static_cast<uint64_t>(seed[r]), static_cast<uint64_t>(offset[r])) *
                kept_total;
  }
  __syncthreads();
  const double target = sh.target;
  // The segment holding the target: the last one with mass that starts at or below it, so exactly
  // one thread owns the draw (an integer max: the same whatever the threads' order). Testing
  // target < mass_before + seg_mass instead compares against a sum rounded differently from the
  // next thread's scanned mass_before: two owners, or none, an ulp apart.
  if (seg_mass > 0 && mass_before <= target) atomicMax(&sh.owner, static_cast<int>(threadIdx.x));
  __syncthreads();
  if (static_cast<int>(threadIdx.x) == sh.owner) {
    double cum = mass_before;
    rank = ties_before;
    int64_t pick = seg_last;  // rounding may keep the running sum at or below the target to the end
    for (int64_t j = lo; j < hi; ++j) {
      const float s = scaled(j);
      if (!kept(s, rank)) continue;
      const double w = exp(static_cast<double>(s) - top);
      if (w < mp) continue;
      cum += w;
      if (cum > target) {
        pick = j;
        break;
      }
    }
    sh.pick = pick;
  }
  __syncthreads();
  if (threadIdx.x == 0) finish_row(out, offset, r, sh.pick, advance);
}

// Draws row r's token into out[r] (int64, contiguous), reading the row's uniform at offset[r];
// with `advance`, offset[r] is then incremented (offset must then be int64 and contiguous).
void launch_sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                   const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset,
                   at::Tensor& out, bool advance) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, "logits must be a CUDA tensor (B, V), got ", logits.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 && vocab < (int64_t{1} << 31), "vocab size must be in [1, 2^31)");
  const std::initializer_list<const at::Tensor*> per_row{&temperature, &top_k, &top_p, &min_p, &seed, &offset, &out};
  for (const at::Tensor* t : per_row) {
    TORCH_CHECK(t->device() == logits.device(), "sampling parameters must be on the logits' device");
  }
  const RowTensors rt = row_tensors(rows, temperature, top_k, top_p, min_p, seed, offset, out, advance);
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gpt2engine_sample", [&] {
    sample_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), vocab, rt.temperature.data_ptr<float>(),
        rt.top_k.data_ptr<int64_t>(), rt.top_p.data_ptr<double>(), rt.min_p.data_ptr<double>(),
        rt.seed.data_ptr<int64_t>(),
        rt.offset.data_ptr<int64_t>(),
        out.data_ptr<int64_t>(), advance);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
                       const at::Tensor& offset) {
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  launch_sample(logits, temperature, top_k, top_p, min_p, seed, offset, out, /*advance=*/false);
  return out;
}

void sample_next_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                      const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed, at::Tensor& offset,
                      at::Tensor& out) {
  check_sample_next_outputs(logits, offset, out);
  launch_sample(logits, temperature, top_k, top_p, min_p, seed, offset, out, /*advance=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt2engine_C, CUDA, m) {
  m.impl("sample", &sample_cuda);
  m.impl("sample_next_", &sample_next_cuda);
}

}  // namespace gpt2engine
