// CPU kernels of the fused output projection + cross entropy (megatron_adapt.kernels.linear_cross_entropy).
//
// One tensor-parallel rank holds rows [0, rows) of its vocabulary slice of the output weight; only
// the first `valid` rows are real tokens (the rest is TP padding). The logits are never stored:
// both kernels walk [tokens x vocabulary] in tiles of kTokens x kVocab, computing a tile of logits
// with a register-blocked dot-product kernel and consuming it at once.
//
//   lse_partials: per token, the running max and sum of exp over this slice (online
//                 log-sum-exp) and the logit of its label if this slice owns it. Python reduces
//                 the three across the TP group.
//   backward:     with the global log-sum-exp, each tile's gradient g = softmax * s - onehot * t
//                 gives the hidden-state gradient (g @ W, threads own token tiles) and the weight
//                 gradient of trainable rows [t0, t1) only (g^T @ h, threads own vocabulary
//                 tiles, recomputing those rows' logits). Every output element has one writer
//                 and sums run in a fixed order: results are deterministic for any thread count.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <omp.h>

namespace py = pybind11;
using Ids = py::array_t<int64_t, py::array::c_style>;
using Floats = py::array_t<float, py::array::c_style>;

namespace {

constexpr int64_t kTokens = 64;
constexpr int64_t kVocab = 64;

// exp(x) for x <= 88 to about 2 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r,
// times 2^n), written so that loops over it vectorize (libm's expf is a scalar call); 0 below -87.
inline float exp_approx(float x) {
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

typedef float vec8 __attribute__((vector_size(32)));    // GCC vector extensions: 8 floats (AVX2)
typedef float vec16 __attribute__((vector_size(64)));   // 16 floats (AVX-512)

template <typename V>
__attribute__((always_inline)) inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
__attribute__((always_inline)) inline void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }

// out[r][:width] += sum_j coef(r, j) * src[j][:width] for r < rows, j < inner, where
// coef(r, j) = coef[r * row_stride + j * col_stride] (a tile of the gradient, or its transpose).
// A block of 4 rows x 4 vectors of out stays in registers while j runs, so each src vector
// loaded feeds four fused multiply-adds. Inlined into one function per instruction set below.
template <typename V, int64_t L>
__attribute__((always_inline)) inline void accumulate_product_impl(
    float* out, int64_t ldo, const float* coef, int64_t row_stride, int64_t col_stride, int64_t rows,
    int64_t inner, const float* src, int64_t lds, int64_t width) {
  int64_t k0 = 0;
  for (; k0 + 4 * L <= width; k0 += 4 * L) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      V acc[4][4];
      for (int q = 0; q < 4; ++q) {
        for (int v = 0; v < 4; ++v) acc[q][v] = load<V>(out + (r + q) * ldo + k0 + L * v);
      }
      const float* c = coef + r * row_stride;
      for (int64_t j = 0; j < inner; ++j) {
        const float* s = src + j * lds + k0;
        const V s0 = load<V>(s), s1 = load<V>(s + L), s2 = load<V>(s + 2 * L), s3 = load<V>(s + 3 * L);
        for (int q = 0; q < 4; ++q) {
          const float cq = c[q * row_stride + j * col_stride];
          acc[q][0] += cq * s0;
          acc[q][1] += cq * s1;
          acc[q][2] += cq * s2;
          acc[q][3] += cq * s3;
        }
      }
      for (int q = 0; q < 4; ++q) {
        for (int v = 0; v < 4; ++v) store<V>(out + (r + q) * ldo + k0 + L * v, acc[q][v]);
      }
    }
    for (; r < rows; ++r) {
      for (int64_t j = 0; j < inner; ++j) {
        const float cr = coef[r * row_stride + j * col_stride];
        const float* s = src + j * lds + k0;
        for (int v = 0; v < 4; ++v) store<V>(out + r * ldo + k0 + L * v, load<V>(out + r * ldo + k0 + L * v) + cr * load<V>(s + L * v));
      }
    }
  }
  for (int64_t r = 0; r < rows && k0 < width; ++r) {  // the last, narrower chunk
    for (int64_t j = 0; j < inner; ++j) {
      const float cr = coef[r * row_stride + j * col_stride];
      const float* s = src + j * lds;
      float* o = out + r * ldo;
      for (int64_t k = k0; k < width; ++k) o[k] += cr * s[k];
    }
  }
}

#define ACCUMULATE_PRODUCT_ARGS                                                                             \
  float *out, int64_t ldo, const float *coef, int64_t row_stride, int64_t col_stride, int64_t rows,        \
      int64_t inner, const float *src, int64_t lds, int64_t width
#define ACCUMULATE_PRODUCT_CALL out, ldo, coef, row_stride, col_stride, rows, inner, src, lds, width

__attribute__((target("arch=x86-64-v4"))) void accumulate_product_avx512(ACCUMULATE_PRODUCT_ARGS) {
  accumulate_product_impl<vec16, 16>(ACCUMULATE_PRODUCT_CALL);
}
__attribute__((target("arch=x86-64-v3"))) void accumulate_product_avx2(ACCUMULATE_PRODUCT_ARGS) {
  accumulate_product_impl<vec8, 8>(ACCUMULATE_PRODUCT_CALL);
}
void accumulate_product_baseline(ACCUMULATE_PRODUCT_ARGS) { accumulate_product_impl<vec8, 8>(ACCUMULATE_PRODUCT_CALL); }

using AccumulateProduct = void (*)(ACCUMULATE_PRODUCT_ARGS);
const AccumulateProduct accumulate_product = [] {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &accumulate_product_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &accumulate_product_avx2;
  return &accumulate_product_baseline;
}();

// Rows [0, n) of b (each of length k) transposed into packed[k][kVocab], zero columns past n: the
// layout in which a logits tile is a sum of outer products (accumulate_product).
void pack_rows(const float* b, int64_t n, int64_t k, float* packed) {
  for (int64_t j = 0; j < kVocab; ++j) {
    const float* row = b + j * k;
    for (int64_t p = 0; p < k; ++p) packed[p * kVocab + j] = j < n ? row[p] : 0.f;
  }
}

// c[i][j] = a[i] . b[j] for m rows of a and the packed rows of b (c has kVocab columns).
void logits_tile(const float* a, int64_t m, int64_t k, const float* packed, float* c) {
  std::fill(c, c + m * kVocab, 0.f);
  accumulate_product(c, kVocab, a, k, 1, m, k, packed, kVocab, kVocab);
}

// This thread's share [first, last) of `count` tiles: contiguous, so a thread packs each weight
// tile once for all its token tiles. Per-token results do not depend on the split.
std::pair<int64_t, int64_t> thread_share(int64_t count) {
  const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
  return {count * t / threads, count * (t + 1) / threads};
}

// Fold an m x n logits tile (columns j0..j0+n) into the running max, sum of exp and label logit
// of tokens i0..i0+m.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void fold_tile(const float* logits, int64_t m, int64_t n, int64_t i0, int64_t j0, const int64_t* labels,
               float* mx, float* se, float* tg) {
  for (int64_t i = 0; i < m; ++i) {
    const float* row = logits + i * kVocab;
    float tile_max = row[0];
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 1; j < n; ++j) tile_max = std::max(tile_max, row[j]);
    const float new_max = std::max(mx[i0 + i], tile_max);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += exp_approx(row[j] - new_max);
    se[i0 + i] = se[i0 + i] * std::exp(mx[i0 + i] - new_max) + s;
    mx[i0 + i] = new_max;
    const int64_t label = labels[i0 + i];
    if (label >= j0 && label < j0 + n) tg[i0 + i] = row[label - j0];
  }
}

struct Problem {
  const float* hidden;
  const float* weight;
  const int64_t* labels;  // local label ids; anything outside [0, valid) is not owned here
  int64_t tokens, hidden_size, valid;
};

Problem problem(const Floats& hidden, const Floats& weight, const Ids& labels, int64_t valid) {
  if (hidden.ndim() != 2 || weight.ndim() != 2 || hidden.shape(1) != weight.shape(1)) {
    throw std::invalid_argument("hidden [N, H] and weight [V, H] must share H");
  }
  if (labels.ndim() != 1 || labels.shape(0) != hidden.shape(0)) {
    throw std::invalid_argument("labels must be [N]");
  }
  if (valid < 0 || valid > weight.shape(0)) throw std::invalid_argument("valid rows out of range");
  return {hidden.data(), weight.data(), labels.data(), hidden.shape(0), hidden.shape(1), valid};
}

float* out_vector(Floats& a, int64_t n, const char* name) {
  if (a.ndim() != 1 || a.shape(0) != n) throw std::invalid_argument(std::string(name) + " must be [N]");
  return a.mutable_data();
}

void lse_partials(const Floats& hidden, const Floats& weight, const Ids& labels, int64_t valid,
                  Floats& max_out, Floats& sum_exp_out, Floats& target_out) {
  const Problem pr = problem(hidden, weight, labels, valid);
  float* mx = out_vector(max_out, pr.tokens, "max");
  float* se = out_vector(sum_exp_out, pr.tokens, "sum_exp");
  float* tg = out_vector(target_out, pr.tokens, "target");
  const int64_t tiles = (pr.tokens + kTokens - 1) / kTokens;
  py::gil_scoped_release release;
#pragma omp parallel
  {
    std::vector<float> logits(kTokens * kVocab), packed(pr.hidden_size * kVocab);
    const auto [first, last] = thread_share(tiles);
    for (int64_t i = first * kTokens; i < std::min(last * kTokens, pr.tokens); ++i) {
      mx[i] = -std::numeric_limits<float>::infinity();
      se[i] = 0.f;
      tg[i] = 0.f;
    }
    for (int64_t j0 = 0; j0 < pr.valid && first < last; j0 += kVocab) {
      const int64_t n = std::min(kVocab, pr.valid - j0);
      pack_rows(pr.weight + j0 * pr.hidden_size, n, pr.hidden_size, packed.data());
      for (int64_t t = first; t < last; ++t) {
        const int64_t i0 = t * kTokens, m = std::min(kTokens, pr.tokens - i0);
        logits_tile(pr.hidden + i0 * pr.hidden_size, m, pr.hidden_size, packed.data(), logits.data());
        fold_tile(logits.data(), m, n, i0, j0, pr.labels, mx, se, tg);
      }
    }
  }
}

// The gradient of a logits tile, in place: g = exp(l - lse) * softmax_scale - [label] * scale.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void tile_gradient(float* tile, int64_t m, int64_t n, int64_t i0, int64_t j0, const Problem& pr,
                   const float* lse, const float* softmax_scale, const float* scale) {
  for (int64_t i = 0; i < m; ++i) {
    float* row = tile + i * kVocab;
    const float l = lse[i0 + i], ss = softmax_scale[i0 + i];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = exp_approx(row[j] - l) * ss;
    const int64_t label = pr.labels[i0 + i];
    if (label >= j0 && label < j0 + n) row[label - j0] -= scale[i0 + i];
  }
}

void backward(const Floats& hidden, const Floats& weight, const Ids& labels, int64_t valid, const Floats& lse_in,
              const Floats& softmax_scale_in, const Floats& scale_in, int64_t t0, int64_t t1,
              Floats& grad_hidden_out, Floats& grad_trainable_out) {
  const Problem pr = problem(hidden, weight, labels, valid);
  const int64_t h = pr.hidden_size;
  if (lse_in.size() != pr.tokens || softmax_scale_in.size() != pr.tokens || scale_in.size() != pr.tokens) {
    throw std::invalid_argument("lse, softmax_scale and scale must be [N]");
  }
  if (grad_hidden_out.ndim() != 2 || grad_hidden_out.shape(0) != pr.tokens || grad_hidden_out.shape(1) != h) {
    throw std::invalid_argument("grad_hidden must be [N, H]");
  }
  if (t0 < 0 || t1 < t0 || t1 > weight.shape(0) || grad_trainable_out.ndim() != 2 ||
      grad_trainable_out.shape(0) != t1 - t0 || grad_trainable_out.shape(1) != h) {
    throw std::invalid_argument("grad_trainable must be [t1 - t0, H] within the slice");
  }
  const float *lse = lse_in.data(), *ss = softmax_scale_in.data(), *sc = scale_in.data();
  float* gh = grad_hidden_out.mutable_data();
  float* gw = grad_trainable_out.mutable_data();
  const int64_t token_tiles = (pr.tokens + kTokens - 1) / kTokens;
  const int64_t w0 = t0, w1 = std::min(t1, pr.valid);  // padding rows have no gradient at all
  const int64_t vocab_tiles = w1 > w0 ? (w1 - w0 + kVocab - 1) / kVocab : 0;
  py::gil_scoped_release release;
#pragma omp parallel
  {
    std::vector<float> tile(kTokens * kVocab), packed(h * kVocab);
    const auto [first, last] = thread_share(token_tiles);  // grad_hidden: each thread owns token rows
    std::fill(gh + std::min(first * kTokens, pr.tokens) * h, gh + std::min(last * kTokens, pr.tokens) * h, 0.f);
    for (int64_t j0 = 0; j0 < pr.valid && first < last; j0 += kVocab) {
      const int64_t n = std::min(kVocab, pr.valid - j0);
      pack_rows(pr.weight + j0 * h, n, h, packed.data());
      for (int64_t t = first; t < last; ++t) {
        const int64_t i0 = t * kTokens, m = std::min(kTokens, pr.tokens - i0);
        logits_tile(pr.hidden + i0 * h, m, h, packed.data(), tile.data());
        tile_gradient(tile.data(), m, n, i0, j0, pr, lse, ss, sc);
        accumulate_product(gh + i0 * h, h, tile.data(), kVocab, 1, m, n, pr.weight + j0 * h, h, h);
      }
    }
#pragma omp for schedule(static)
    for (int64_t v = 0; v < vocab_tiles; ++v) {  // grad of trainable rows: each thread owns rows
      const int64_t j0 = w0 + v * kVocab, n = std::min(kVocab, w1 - j0);
      std::fill(gw + (j0 - t0) * h, gw + (j0 - t0 + n) * h, 0.f);
      pack_rows(pr.weight + j0 * h, n, h, packed.data());
      for (int64_t i0 = 0; i0 < pr.tokens; i0 += kTokens) {
        const int64_t m = std::min(kTokens, pr.tokens - i0);
        logits_tile(pr.hidden + i0 * h, m, h, packed.data(), tile.data());
        tile_gradient(tile.data(), m, n, i0, j0, pr, lse, ss, sc);
        accumulate_product(gw + (j0 - t0) * h, h, tile.data(), 1, kVocab, n, m, pr.hidden + i0 * h, h, h);
      }
    }
  }
  if (w1 < t1) std::fill(gw + (std::max(w1, t0) - t0) * h, gw + (t1 - t0) * h, 0.f);
}

}  // namespace

void register_linear_cross_entropy(py::module_& m) {
  m.def("lce_lse_partials", &lse_partials, py::arg("hidden"), py::arg("weight"), py::arg("labels"),
        py::arg("valid"), py::arg("max"), py::arg("sum_exp"), py::arg("target"),
        "per-token max, sum of exp and label logit over rows [0, valid) of this vocabulary slice");
  m.def("lce_backward", &backward, py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("valid"),
        py::arg("lse"), py::arg("softmax_scale"), py::arg("scale"), py::arg("t0"), py::arg("t1"),
        py::arg("grad_hidden"), py::arg("grad_trainable"),
        "hidden-state gradient and the gradient of rows [t0, t1) from the global log-sum-exp");
}
