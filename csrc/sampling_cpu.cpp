// Sampling on CPU: temperature, then top-k, then top-p over the renormalised rest, then min-p (HF
// semantics, spelled out in gpt2kernels/sampling.py). Rows run in parallel; a row touches only its own logits.
// Sort-free where it can be: top-k by selection (nth_element), top-p by sorting only the tokens
// above a probability threshold that provably holds the nucleus.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <vector>

#include "philox.h"
#include "sampling.h"
#include "thread_team.h"

namespace gpt2engine {

namespace {

constexpr int64_t kHeapTopK = 1024;  // up to here a heap beats nth_element's full copy of the row

struct RowParams {
  float temperature;
  int64_t top_k;
  double top_p;
  double min_p;
  double u;
};

// Returns the token, or -1 for a row of NaN or only -inf.
int64_t sample_row(const float* x, int64_t stride, int64_t vocab, const RowParams& prm, std::vector<float>& scaled,
                   std::vector<double>& weights, std::vector<int64_t>& ids, std::vector<float>& scratch) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t argmax = -1;
  for (int64_t j = 0; j < vocab; ++j) {
    const float v = x[j * stride];
    if (std::isnan(v)) return -1;
    if (v > best) {  // strict: the first index wins ties
      best = v;
      argmax = j;
    }
  }
  if (argmax < 0) return -1;  // every logit is -inf
  // Greedy, also where the top scaled logit is not finite: a +inf logit, or a temperature so small
  // that the division overflows (its limit is the argmax).
  if (prm.temperature == 0.0f || prm.top_k == 1 || !std::isfinite(best / prm.temperature)) return argmax;

  for (int64_t j = 0; j < vocab; ++j) scaled[j] = x[j * stride] / prm.temperature;
  const double top = static_cast<double>(best / prm.temperature);
  // Top-k keeps every token >= the k-th largest scaled logit (ties at the boundary included).
  float kth = -std::numeric_limits<float>::infinity();
  if (prm.top_k > 0 && prm.top_k < vocab) {
    if (prm.top_k <= kHeapTopK) {
      // A min-heap of the k largest seen so far: almost every logit fails one comparison with its top.
      scratch.assign(scaled.begin(), scaled.begin() + prm.top_k);
      std::make_heap(scratch.begin(), scratch.end(), std::greater<float>());
      for (int64_t j = prm.top_k; j < vocab; ++j) {
        if (scaled[j] > scratch.front()) {
          std::pop_heap(scratch.begin(), scratch.end(), std::greater<float>());
          scratch.back() = scaled[j];
          std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
        }
      }
      kth = scratch.front();
    } else {
      scratch.assign(scaled.begin(), scaled.begin() + vocab);
      std::nth_element(scratch.begin(), scratch.begin() + (prm.top_k - 1), scratch.end(), std::greater<float>());
      kth = scratch[prm.top_k - 1];
    }
  }
  // Unnormalised weights of the top-k survivors (0 for the rest and for -inf), computed once.
  double total = 0.0;
  for (int64_t j = 0; j < vocab; ++j) {
    weights[j] = scaled[j] >= kth ? std::exp(static_cast<double>(scaled[j]) - top) : 0.0;
    total += weights[j];
  }
  ids.clear();
  if (prm.top_p < 1.0) {
    // The nucleus is the prefix of the sorted survivors whose preceding mass is < top_p. Any set
    // {weight >= t} whose mass reaches top_p contains it, so sort only that set, lowering t until it does.
    for (double t = 1.0 / 16;; t /= 16) {
      ids.clear();
      double mass = 0.0;
      for (int64_t j = 0; j < vocab; ++j) {
        if (weights[j] >= t && scaled[j] >= kth) {
          ids.push_back(j);
          mass += weights[j];
        }
      }
      if (mass >= prm.top_p * total || t < 1e-300) break;
    }
    std::sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) {
      return scaled[a] > scaled[b] || (scaled[a] == scaled[b] && a < b);
    });
    double before = 0.0;
    size_t keep = 0;
    for (; keep < ids.size(); ++keep) {
      if (keep > 0 && before >= prm.top_p) break;  // the top token is always kept
      before += weights[ids[keep]] / total;
    }
    ids.resize(keep);
    std::sort(ids.begin(), ids.end());  // the draw walks the kept tokens in vocabulary order
  } else {
    for (int64_t j = 0; j < vocab; ++j) {
      if (scaled[j] >= kth) ids.push_back(j);
    }
  }
  if (prm.min_p > 0.0) {  // weights are exp(scaled - top): the top token's is 1, so it always stays
    ids.erase(std::remove_if(ids.begin(), ids.end(), [&](int64_t j) { return weights[j] < prm.min_p; }), ids.end());
  }
  // Inverse CDF over the kept tokens in vocabulary order: the first whose cumulative weight exceeds u * mass.
  double kept = 0.0;
  for (int64_t j : ids) kept += weights[j];
  const double target = prm.u * kept;
  double cum = 0.0;
  int64_t last_positive = ids.front();
  for (int64_t j : ids) {
    if (weights[j] > 0) last_positive = j;
    cum += weights[j];
    if (cum > target) return j;
  }
  return last_positive;  // rounding left the target at the very end
}

// Draws row r's token into out[r] (int64, contiguous), reading the row's uniform at offset[r];
// with `advance`, offset[r] is then incremented (offset must then be int64 and contiguous).
void sample_rows(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                 const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset,
                 at::Tensor& out, bool advance) {
  TORCH_CHECK(logits.dim() == 2, "logits must be (B, V), got ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const at::Tensor x = logits.scalar_type() == at::kFloat ? logits : logits.to(at::kFloat);
  const RowTensors rt = row_tensors(rows, temperature, top_k, top_p, min_p, seed, offset, out, advance);
  if (rows == 0) return;
  TORCH_CHECK(vocab > 0, "logits must have at least one column");
  const float* xp = x.data_ptr<float>();
  const int64_t stride_row = x.stride(0), stride_col = x.stride(1);
  const float* tp = rt.temperature.data_ptr<float>();
  const int64_t* kp = rt.top_k.data_ptr<int64_t>();
  const double* pp = rt.top_p.data_ptr<double>();
  const double* mp = rt.min_p.data_ptr<double>();
  const int64_t* sp = rt.seed.data_ptr<int64_t>();
  int64_t* offp = rt.offset.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  cpu_decode::parallel_range(rows, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(vocab), scratch;
    std::vector<double> weights(vocab);
    std::vector<int64_t> ids;
    ids.reserve(1024);
    for (int64_t r = begin; r < end; ++r) {
      const double u = philox_uniform(static_cast<uint64_t>(sp[r]), static_cast<uint64_t>(offp[r]));
      const RowParams prm{tp[r], kp[r], pp[r], mp[r], u};
      op[r] = sample_row(xp + r * stride_row, stride_col, vocab, prm, scaled, weights, ids, scratch);
      if (advance) offp[r] += 1;
    }
  });
  cpu_decode::team().rest();
}

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                      const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
                      const at::Tensor& offset) {
  TORCH_CHECK(logits.dim() == 2, "logits must be (B, V), got ", logits.sizes());
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  sample_rows(logits, temperature, top_k, top_p, min_p, seed, offset, out, /*advance=*/false);
  return out;
}

void sample_next_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                     const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed, at::Tensor& offset,
                     at::Tensor& out) {
  check_sample_next_outputs(logits, offset, out);
  sample_rows(logits, temperature, top_k, top_p, min_p, seed, offset, out, /*advance=*/true);
}

}  // namespace

RowTensors row_tensors(int64_t rows, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                       const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out,
                       bool advance) {
  RowTensors rt{temperature.to(at::kFloat).contiguous(), top_k.to(at::kLong).contiguous(),
                top_p.to(at::kDouble).contiguous(), min_p.to(at::kDouble).contiguous(), seed.to(at::kLong).contiguous(),
                advance ? offset : offset.to(at::kLong).contiguous()};
  const std::initializer_list<const at::Tensor*> per_row{&rt.temperature, &rt.top_k,  &rt.top_p, &rt.min_p,
                                                         &rt.seed,        &rt.offset, &out};
  for (const at::Tensor* t : per_row) {
    TORCH_CHECK(t->numel() == rows, "per-row parameters must have ", rows, " values");
  }
  return rt;
}

void check_sample_next_outputs(const at::Tensor& logits, const at::Tensor& offset, const at::Tensor& out) {
  TORCH_CHECK(logits.dim() == 2, "logits must be (B, V), got ", logits.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"offset", &offset}, {"out", &out}}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == logits.size(0) && t->is_contiguous(),
                name, " must be a contiguous int64 (B,) tensor with B = ", logits.size(0), ", got ",
                t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(t->device() == logits.device(), name, " must be on the logits' device");
  }
}

TORCH_LIBRARY(gpt2engine_C, m) {
  // The controls in gpt2kernels.sampling.SAMPLING_CONTROLS' order (a test checks it), then the
  // random stream (seed, offset).
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed, "
        "Tensor offset) -> Tensor");
  // Draws into `out` and advances each row's offset by one: one kernel for a decode step's sampling.
  m.def("sample_next_(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed, "
        "Tensor(a!) offset, Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(gpt2engine_C, CPU, m) {
  m.impl("sample", &sample_cpu);
  m.impl("sample_next_", &sample_next_cpu);
}

}  // namespace gpt2engine
