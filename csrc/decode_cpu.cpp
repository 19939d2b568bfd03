// A whole GPT-2 decode step on CPU in one call, over int8 weights packed once at load: embedding,
// every block (LayerNorm, QKV, cache write, attention, projections, GELU, residuals), ln_f and the
// lm_head, in fp32 with int8 x uint8 products. Python's per-op dispatch (~150 small ops a token)
// is gone; each GEMV streams its packed weights once per step, split by 64-column tiles over as
// many threads as torch.set_num_threads gives the calling thread (a team of its own: thread_team.h).
//
// The kernels come in three builds of decode_cpu_isa.h (AVX-512 VNNI, AVX2, portable), chosen at
// run time by what the processor supports; the semantics are gpt2kernels.cpu_decode's references.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "decode_cpu.h"
#include "thread_team.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#define GPT2_ISA 2
#define GPT2_ISA_NS isa_avx512_vnni
#include "decode_cpu_isa.h"
#undef GPT2_ISA_NS
#undef GPT2_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define GPT2_ISA 1
#define GPT2_ISA_NS isa_avx2
#include "decode_cpu_isa.h"
#undef GPT2_ISA_NS
#undef GPT2_ISA
#pragma GCC pop_options

#define GPT2_ISA 0
#define GPT2_ISA_NS isa_portable
#include "decode_cpu_isa.h"
#undef GPT2_ISA_NS
#undef GPT2_ISA

namespace gpt2engine::cpu_decode {
namespace {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512Vnni = 2 };
const char* const kIsaNames[] = {"portable", "avx2", "avx512_vnni"};

int64_t detected_isa() {
  static const int64_t isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return int64_t{kAvx512Vnni};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return int64_t{kAvx2};
    return int64_t{kPortable};
  }();
  return isa;
}

// The kernels for `isa` (-1: the best this processor runs); an error for one it cannot run.
const Kernels& kernels_for(int64_t isa) {
  const int64_t best = detected_isa();
  if (isa < 0) isa = best;
  TORCH_CHECK(isa <= kAvx512Vnni, "isa must be -1 (automatic), 0 (portable), 1 (avx2) or 2 (avx512_vnni), got ", isa);
  TORCH_CHECK(isa <= best, "this processor cannot run the ", kIsaNames[isa], " kernels; the best it supports is ",
              kIsaNames[best]);
  static const Kernels* const table[] = {&isa_portable::kernels, &isa_avx2::kernels, &isa_avx512_vnni::kernels};
  return *table[isa];
}

int64_t padded_k(int64_t k) { return (k + 3) / 4 * 4; }

// A packed weight with its per-channel data, checked once. `data` is the packed values: the
// tensor's, or (in a decoder) a copy in its huge-page arena, the tensor then released.
struct Int8Weight {
  at::Tensor packed, colsum, scale, bias;
  int64_t n = 0, k = 0;
  const int8_t* data = nullptr;

  Int8Weight() = default;
  Int8Weight(const std::string& name, at::Tensor packed_, at::Tensor colsum_, at::Tensor scale_, at::Tensor bias_,
             int64_t n_, int64_t k_)
      : packed(std::move(packed_)), colsum(std::move(colsum_)), scale(std::move(scale_)), bias(std::move(bias_)),
        n(n_), k(k_) {
    const int64_t tiles = (n + 63) / 64, groups = padded_k(k) / 4;
    TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 4 &&
                    packed.size(0) == tiles && packed.size(1) == groups && packed.size(2) == 64 &&
                    packed.size(3) == 4,
                name, ": packed must be a contiguous int8 (", tiles, ", ", groups, ", 64, 4) tensor for a (", n,
                ", ", k, ") weight, got ", packed.scalar_type(), " ", packed.sizes());
    TORCH_CHECK(colsum.scalar_type() == at::kInt && colsum.is_contiguous() && colsum.numel() == n, name,
                ": colsum must be a contiguous int32 (", n, ",) tensor, got ", colsum.scalar_type(), " ",
                colsum.sizes());
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n, name,
                ": scale must be a contiguous float32 (", n, ",) tensor, got ", scale.scalar_type(), " ",
                scale.sizes());
    TORCH_CHECK(!bias.defined() || bias.numel() == 0 ||
                    (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == n),
                name, ": bias must be empty or a contiguous float32 (", n, ",) tensor, got ", bias.scalar_type(), " ",
                bias.sizes());
    for (const at::Tensor* t : {&packed, &colsum, &scale})
      TORCH_CHECK(t->device().is_cpu(), name, ": every tensor must be on the CPU");
    data = packed.data_ptr<int8_t>();
  }

  const float* bias_ptr() const { return bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr; }
};

// Runs `w` on quantised rows, its 64-column tiles split over the intra-op threads.
void run_gemv(const Kernels& kern, const Int8Weight& w, int64_t rows, const uint8_t* xq, const float* xs,
              const int32_t* xz, float* out, int64_t out_stride, const float* residual, int64_t res_stride,
              bool gelu) {
  GemvArgs a{w.data, w.colsum.data_ptr<int32_t>(), w.scale.data_ptr<float>(), w.bias_ptr(),
             w.n, padded_k(w.k), rows, xq, xs, xz, out, out_stride, residual, res_stride, gelu};
  parallel_range((w.n + 63) / 64, [&](int64_t t0, int64_t t1) { kern.gemv_tiles(a, t0, t1); });
}

at::Tensor check_float_rows(const at::Tensor& x, const char* name, int64_t width) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == width, name,
              " must be a float32 CPU (rows, ", width, ") tensor, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  return x.contiguous();
}

// y = activation(x @ dequantised(w).T + bias) + residual, x quantised per row (gpt2kernels.cpu_decode.int8_linear).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& colsum, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, int64_t k, const std::optional<std::string>& activation,
                       const std::optional<at::Tensor>& residual, int64_t isa) {
  const Kernels& kern = kernels_for(isa);
  const int64_t n = colsum.numel();
  Int8Weight w("int8_linear", packed, colsum, scale, bias.value_or(at::Tensor()), n, k);
  const at::Tensor xc = check_float_rows(x, "x", k);
  TORCH_CHECK(!activation || *activation == "gelu_tanh", "activation must be None or 'gelu_tanh', got '",
              *activation, "'");
  const int64_t rows = xc.size(0), kp = padded_k(k);
  at::Tensor out = at::empty({rows, n}, xc.options());
  at::Tensor res;
  if (residual) {
    res = check_float_rows(*residual, "residual", n);
    TORCH_CHECK(res.size(0) == rows, "residual must have x's ", rows, " rows, got ", res.size(0));
  }
  std::vector<uint8_t> xq(rows * kp);
  std::vector<float> xs(rows);
  std::vector<int32_t> xz(rows);
  kern.quantize_rows(xc.data_ptr<float>(), k, rows, k, kp, xq.data(), xs.data(), xz.data());
  run_gemv(kern, w, rows, xq.data(), xs.data(), xz.data(), out.data_ptr<float>(), n,
           res.defined() ? res.data_ptr<float>() : nullptr, n, activation.has_value());
  team().rest();
  return out;
}

// Memory in 2 MiB pages where the kernel grants them (transparent huge pages, on request): fewer
// TLB misses, and the prefetchers stop at fewer page boundaries. gpt2's batch-1 step took 2.40-2.49
// ms from such pages against 2.52-2.67 from 4 KiB ones (medians of 128 steps, builds alternating,
// 2 threads, the 2-core EPYC; its bandwidth drifts between runs, so only alternating runs compare).
class HugePageArena {
 public:
  static constexpr size_t kPage = size_t{2} << 20;

  explicit HugePageArena(size_t bytes) : size_((bytes + kPage - 1) / kPage * kPage) {
    if (size_ == 0) return;
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kPage, size_) == 0, "cannot allocate ", size_, " bytes for the packed weights");
    base_ = static_cast<int8_t*>(p);
#ifdef MADV_HUGEPAGE
    madvise(base_, size_, MADV_HUGEPAGE);  // advice only: 4 KiB pages where it is not granted
#endif
  }
  ~HugePageArena() { free(base_); }
  HugePageArena(const HugePageArena&) = delete;
  HugePageArena& operator=(const HugePageArena&) = delete;

  // Copies `bytes` from `src` to the next free place (64-byte aligned) and returns it.
  const int8_t* append(const int8_t* src, size_t bytes) {
    TORCH_CHECK(used_ + bytes <= size_, "packed weights overflow their arena");
    int8_t* dst = base_ + used_;
    std::memcpy(dst, src, bytes);
    used_ += (bytes + 63) / 64 * 64;
    return dst;
  }

 private:
  size_t size_, used_ = 0;
  int8_t* base_ = nullptr;
};

constexpr int64_t kTensorsPerLayer = 20;  // ln_1 (2), c_attn (4), attn c_proj (4), ln_2 (2), c_fc (4), mlp c_proj (4)

// GPT-2's weights for the step, packed once (gpt2kernels.cpu_decode.Int8Decoder builds it).
class Int8Decoder : public torch::CustomClassHolder {
 public:
  // shape: [n_layer, n_head, n_embd, mlp_width, vocab_size, n_positions]; tensors: wte, wpe, then
  // kTensorsPerLayer per layer (each linear as packed, colsum, scale, bias), then ln_f's weight and
  // bias, then the lm_head's packed, colsum, scale (three empty tensors: none; `step` then returns
  // the hidden state after ln_f).
  Int8Decoder(std::vector<int64_t> shape, double eps, std::vector<at::Tensor> tensors, int64_t isa)
      : kern_(&kernels_for(isa)), isa_(isa < 0 ? detected_isa() : isa), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(shape.size() == 6, "shape must be [n_layer, n_head, n_embd, mlp_width, vocab_size, n_positions]");
    layers_ = shape[0], heads_ = shape[1], c_ = shape[2], f_ = shape[3], vocab_ = shape[4], positions_ = shape[5];
    TORCH_CHECK(layers_ > 0 && heads_ > 0 && c_ % heads_ == 0 && f_ > 0 && vocab_ > 0 && positions_ > 0,
                "invalid shape ", shape);
    const size_t expected = 2 + kTensorsPerLayer * layers_ + 2 + 3;
    TORCH_CHECK(tensors.size() == expected, "expected ", expected, " tensors for ", layers_, " layers, got ",
                tensors.size());
    size_t i = 0;
    auto vector = [&](const char* name, int64_t numel) {
      const at::Tensor& t = tensors[i++];
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
                  name, " must be a contiguous float32 CPU tensor of ", numel, " values, got ", t.scalar_type(), " ",
                  t.sizes());
      return t;
    };
    auto linear = [&](const std::string& name, int64_t n, int64_t k) {
      Int8Weight w(name, tensors[i], tensors[i + 1], tensors[i + 2], tensors[i + 3], n, k);
      i += 4;
      return w;
    };
    wte_ = vector("wte", vocab_ * c_);
    wpe_ = vector("wpe", positions_ * c_);
    for (int64_t l = 0; l < layers_; ++l) {
      const std::string p = "h." + std::to_string(l) + ".";
      Layer L;
      L.ln1_w = vector("ln_1.weight", c_);
      L.ln1_b = vector("ln_1.bias", c_);
      L.qkv = linear(p + "attn.c_attn", 3 * c_, c_);
      L.proj = linear(p + "attn.c_proj", c_, c_);
      L.ln2_w = vector("ln_2.weight", c_);
      L.ln2_b = vector("ln_2.bias", c_);
      L.fc = linear(p + "mlp.c_fc", f_, c_);
      L.fc_proj = linear(p + "mlp.c_proj", c_, f_);
      blocks_.push_back(std::move(L));
    }
    lnf_w_ = vector("ln_f.weight", c_);
    lnf_b_ = vector("ln_f.bias", c_);
    if (tensors[i].numel() > 0)
      head_ = Int8Weight("lm_head", tensors[i], tensors[i + 1], tensors[i + 2], at::Tensor(), vocab_, c_);
    move_to_arena();
  }

  int64_t isa() const { return isa_; }
  bool has_head() const { return head_.data != nullptr; }

  // One step for slots [0, B): appends tokens (B,) at each slot's length in k_cache / v_cache (L,
  // slots, heads, max_len, head_dim, float32), advances cache_lens (int32, >= B slots) and writes
  // out (B, vocab) logits, or (B, n_embd) hidden states after ln_f without a head.
  void step(const at::Tensor& tokens, const at::Tensor& cache_lens, const at::Tensor& k_cache,
            const at::Tensor& v_cache, const at::Tensor& out) {
    check_step(tokens, cache_lens, k_cache, v_cache, out);
    const int64_t b = tokens.size(0), d = c_ / heads_, slots = k_cache.size(1), max_len = k_cache.size(3);
    const int64_t* tok = tokens.data_ptr<int64_t>();
    int32_t* lens = cache_lens.data_ptr<int32_t>();
    for (int64_t r = 0; r < b; ++r) {
      TORCH_CHECK(tok[r] >= 0 && tok[r] < vocab_, "token ", tok[r], " of row ", r, " is outside the vocabulary [0, ",
                  vocab_, ")");
      TORCH_CHECK(lens[r] >= 0 && lens[r] < max_len && lens[r] < positions_, "row ", r, " has ", lens[r],
                  " cached positions: no room for another (cache ", max_len, ", model ", positions_, ")");
    }
    reserve(b, max_len);
    float* x = x_.data();
    const float* wte = wte_.data_ptr<float>();
    const float* wpe = wpe_.data_ptr<float>();
    for (int64_t r = 0; r < b; ++r) {
      const float* e = wte + tok[r] * c_;
      const float* p = wpe + static_cast<int64_t>(lens[r]) * c_;
      for (int64_t j = 0; j < c_; ++j) x[r * c_ + j] = e[j] + p[j];
      lens[r] += 1;
    }
    const int64_t layer_stride = slots * heads_ * max_len * d;
    for (int64_t l = 0; l < layers_; ++l) {
      const Layer& L = blocks_[l];
      norm_and_quantize(b, x, L.ln1_w, L.ln1_b);
      run_gemv(*kern_, L.qkv, b, xq_.data(), xs_.data(), xz_.data(), qkv_.data(), 3 * c_, nullptr, 0, false);
      AttentionArgs a{qkv_.data(), 3 * c_, k_cache.data_ptr<float>() + l * layer_stride,
                      v_cache.data_ptr<float>() + l * layer_stride, lens, heads_, d, max_len, scores_.data(),
                      att_.data(), c_};
      parallel_range(b * heads_, [&](int64_t i0, int64_t i1) { kern_->attention_heads(a, i0, i1); });
      quantize(b, att_.data(), c_);
      run_gemv(*kern_, L.proj, b, xq_.data(), xs_.data(), xz_.data(), x, c_, x, c_, false);
      norm_and_quantize(b, x, L.ln2_w, L.ln2_b);
      run_gemv(*kern_, L.fc, b, xq_.data(), xs_.data(), xz_.data(), h_.data(), f_, nullptr, 0, true);
      quantize(b, h_.data(), f_);
      run_gemv(*kern_, L.fc_proj, b, xq_.data(), xs_.data(), xz_.data(), x, c_, x, c_, false);
    }
    float* o = out.data_ptr<float>();
    if (!has_head()) {
      team().rest();
      kern_->layer_norm_rows(x, c_, b, c_, lnf_w_.data_ptr<float>(), lnf_b_.data_ptr<float>(), eps_, o, c_);
      return;
    }
    norm_and_quantize(b, x, lnf_w_, lnf_b_);
    run_gemv(*kern_, head_, b, xq_.data(), xs_.data(), xz_.data(), o, vocab_, nullptr, 0, false);
    team().rest();
  }

 private:
  struct Layer {
    at::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
    Int8Weight qkv, proj, fc, fc_proj;
  };

  void check_step(const at::Tensor& tokens, const at::Tensor& cache_lens, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& out) const {
    TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.dim() == 1 &&
                    tokens.is_contiguous() && tokens.size(0) > 0,
                "tokens must be a contiguous int64 CPU (B,) tensor with B >= 1, got ", tokens.scalar_type(), " ",
                tokens.sizes());
    const int64_t b = tokens.size(0), d = c_ / heads_;
    for (const at::Tensor* t : {&k_cache, &v_cache})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 5 &&
                      t->size(0) == layers_ && t->size(2) == heads_ && t->size(4) == d && t->size(1) >= b,
                  "k_cache and v_cache must be contiguous float32 CPU (", layers_, ", slots >= ", b, ", ", heads_,
                  ", max_len, ", d, ") tensors, got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
                " differ");
    TORCH_CHECK(cache_lens.device().is_cpu() && cache_lens.scalar_type() == at::kInt && cache_lens.dim() == 1 &&
                    cache_lens.is_contiguous() && cache_lens.size(0) >= b,
                "cache_lens must be a contiguous int32 CPU tensor of >= ", b, " slots, got ",
                cache_lens.scalar_type(), " ", cache_lens.sizes());
    const int64_t width = has_head() ? vocab_ : c_;
    TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                    out.size(0) == b && out.size(1) == width,
                "out must be a contiguous float32 CPU (", b, ", ", width, ") tensor, got ", out.scalar_type(), " ",
                out.sizes());
  }

  // Every packed weight into one huge-page arena, in the order a step reads them; the tensors go.
  void move_to_arena() {
    std::vector<Int8Weight*> all;
    for (Layer& L : blocks_)
      for (Int8Weight* w : {&L.qkv, &L.proj, &L.fc, &L.fc_proj}) all.push_back(w);
    if (has_head()) all.push_back(&head_);
    size_t bytes = 0;
    for (const Int8Weight* w : all) bytes += (w->packed.nbytes() + 63) / 64 * 64;
    arena_ = std::make_unique<HugePageArena>(bytes);
    for (Int8Weight* w : all) {
      w->data = arena_->append(w->packed.data_ptr<int8_t>(), w->packed.nbytes());
      w->packed = at::Tensor();
    }
  }

  void reserve(int64_t b, int64_t max_len) {
    const int64_t kp = padded_k(f_ > c_ ? f_ : c_);
    if (rows_ >= b && max_len_ >= max_len) return;
    rows_ = rows_ > b ? rows_ : b;
    max_len_ = max_len_ > max_len ? max_len_ : max_len;
    x_.resize(rows_ * c_), qkv_.resize(rows_ * 3 * c_), att_.resize(rows_ * c_), h_.resize(rows_ * f_);
    xq_.resize(rows_ * kp), xs_.resize(rows_), xz_.resize(rows_);
    norm_.resize(rows_ * c_), scores_.resize(rows_ * heads_ * max_len_);
  }

  // Rows of `x` (b, width) -> xq_ / xs_ / xz_, one row per thread when there are several.
  void quantize(int64_t b, const float* x, int64_t width) {
    const int64_t kp = padded_k(width);
    parallel_range(b, [&](int64_t r0, int64_t r1) {
      kern_->quantize_rows(x + r0 * width, width, r1 - r0, width, kp, xq_.data() + r0 * kp, xs_.data() + r0,
                           xz_.data() + r0);
    });
  }

  void norm_and_quantize(int64_t b, const float* x, const at::Tensor& w, const at::Tensor& bias) {
    kern_->layer_norm_rows(x, c_, b, c_, w.data_ptr<float>(), bias.data_ptr<float>(), eps_, norm_.data(), c_);
    quantize(b, norm_.data(), c_);
  }

  std::unique_ptr<HugePageArena> arena_;
  const Kernels* kern_;
  int64_t isa_;
  float eps_;
  int64_t layers_ = 0, heads_ = 0, c_ = 0, f_ = 0, vocab_ = 0, positions_ = 0;
  at::Tensor wte_, wpe_, lnf_w_, lnf_b_;
  std::vector<Layer> blocks_;
  Int8Weight head_;
  int64_t rows_ = 0, max_len_ = 0;
  std::vector<float> x_, qkv_, att_, h_, norm_, scores_, xs_;
  std::vector<uint8_t> xq_;
  std::vector<int32_t> xz_;
};

int64_t cpu_isa() { return detected_isa(); }

// How many threads the step's parallel loops run on from this thread: the distinct threads that
// ran a part of one.
int64_t parallel_threads() {
  std::mutex mutex;
  std::vector<std::thread::id> seen;
  parallel_range(int64_t{1} << 16, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    if (std::find(seen.begin(), seen.end(), std::this_thread::get_id()) == seen.end())
      seen.push_back(std::this_thread::get_id());
  });
  team().rest();
  return static_cast<int64_t>(seen.size());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2engine_C, m) {
  // The instruction set the int8 CPU kernels use here: 0 portable, 1 avx2, 2 avx512_vnni.
  m.def("cpu_isa() -> int", &cpu_isa);
  m.def("parallel_threads() -> int", &parallel_threads);
  m.def("int8_linear(Tensor x, Tensor packed, Tensor colsum, Tensor scale, Tensor? bias, int k, str? activation, "
        "Tensor? residual, int isa=-1) -> Tensor");
  m.impl("int8_linear", c10::DispatchKey::CPU, &int8_linear);
  m.class_<Int8Decoder>("Int8Decoder")
      .def(torch::init<std::vector<int64_t>, double, std::vector<at::Tensor>, int64_t>())
      .def("step", &Int8Decoder::step)
      .def("isa", &Int8Decoder::isa)
      .def("has_head", &Int8Decoder::has_head);
}

}  // namespace gpt2engine::cpu_decode
