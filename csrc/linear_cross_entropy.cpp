// CPU kernels of the fused output projection + cross entropy (megatron_adapt.kernels.linear_cross_entropy).
//
// Python computes the logits of one chunk of tokens against this tensor-parallel rank's slice of
// the vocabulary with a BLAS matrix product; these kernels are the two steps between the matrix
// products, one pass over the chunk each, with a thread per block of rows:
//
//   chunk_stats:     per token, the max logit, the sum of exp(logit - max) and the logit of its
//                    label if this slice owns it (Python merges the three across the TP group).
//   chunk_gradient:  with the merged log-sum-exp, the logits become their own gradient in place:
//                    g = exp(logit - lse) * softmax_scale - [label] * scale.
//
// Each row is computed by one thread in a fixed order, so results do not depend on the thread count.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace py = pybind11;
using Ids = py::array_t<int64_t, py::array::c_style>;
using Floats = py::array_t<float, py::array::c_style>;

namespace {

struct Chunk {
  int64_t tokens, vocab;
  const int64_t* labels;  // local label ids; anything outside [0, vocab) is not owned here
};

Chunk chunk(const Floats& logits, const Ids& labels) {
  if (logits.ndim() != 2) throw std::invalid_argument("logits must be [tokens, vocabulary slice]");
  if (labels.ndim() != 1 || labels.shape(0) != logits.shape(0)) {
    throw std::invalid_argument("labels must be [tokens], one per row of the logits");
  }
  return {logits.shape(0), logits.shape(1), labels.data()};
}

void check_per_token(const Floats& a, int64_t n, const char* name) {
  if (a.ndim() != 1 || a.shape(0) != n) throw std::invalid_argument(std::string(name) + " must be [tokens]");
}

typedef float vec16 __attribute__((vector_size(64)));  // GCC vector extensions: 16 floats (AVX-512)
typedef int32_t ivec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));   // 8 floats (AVX2)
typedef int32_t ivec8 __attribute__((vector_size(32)));

template <typename V>
__attribute__((always_inline)) inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The n < lanes elements at p in the first lanes of a vector, `fill` in the others: a row's tail.
template <typename V>
__attribute__((always_inline)) inline V load_tail(const float* p, int64_t n, float fill) {
  V v = V{} + fill;
  for (int64_t k = 0; k < n; ++k) v[k] = p[k];
  return v;
}

// exp(x) on every lane for x <= 88 to about 2 ulp, 0 below -87 (Cephes' expf: x = n ln2 + r, a
// degree-6 polynomial in r, times 2^n; libm's expf is a scalar call). Adding 1.5 * 2^23 rounds
// x / ln2 to the integer n and leaves n in the low mantissa bits, from which 2^n is built.
template <typename V, typename VI>
__attribute__((always_inline)) inline V exp_lanes(V x) {
  const V magic = V{} + 12582912.0f;
  const V c = x < -87.0f ? V{} - 87.0f : (x > 88.0f ? V{} + 88.0f : x);
  const V t = c * 1.44269504088896341f + magic;
  const V n = t - magic;
  const V r = c - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI scale = ((VI)t - (VI)magic + 127) << 23;  // (VI)t: the bits of t, not a conversion
  return x < -87.0f ? V{} : p * (V)scale;
}

// Max and sum of exp(x - max) of one row in a single pass: each block (small enough to stay in
// L1) is read from memory once, and a running max and rescaled running sum carry across blocks.
template <typename V, typename VI>
__attribute__((always_inline)) inline void row_max_sum_exp_impl(const float* row, int64_t n, float* max_out,
                                                                float* sum_out) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(float), kBlock = 2048;
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();  // also a tail's padding: exp gives 0
  float m = kMinusInf, s = 0.f;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    V lanes = V{} + kMinusInf;
    int64_t j = j0;
    for (; j + kLanes <= j1; j += kLanes) {
      const V x = load<V>(row + j);
      lanes = x > lanes ? x : lanes;
    }
    const V tail = load_tail<V>(row + j, j1 - j, kMinusInf);
    lanes = tail > lanes ? tail : lanes;
    float block_max = kMinusInf;
    for (int64_t k = 0; k < kLanes; ++k) block_max = std::max(block_max, lanes[k]);
    const float new_max = std::max(m, block_max);
    V sums = exp_lanes<V, VI>(tail - new_max);
    for (j = j0; j + kLanes <= j1; j += kLanes) sums += exp_lanes<V, VI>(load<V>(row + j) - new_max);
    float block_sum = 0.f;
    for (int64_t k = 0; k < kLanes; ++k) block_sum += sums[k];
    s = (new_max == m ? s : s * std::exp(m - new_max)) + block_sum;
    m = new_max;
  }
  *max_out = m;
  *sum_out = s;
}

// row[j] = exp(row[j] - lse) * softmax_scale, in place.
template <typename V, typename VI>
__attribute__((always_inline)) inline void row_softmax_impl(float* row, int64_t n, float lse, float softmax_scale) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(float);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const V g = exp_lanes<V, VI>(load<V>(row + j) - lse) * softmax_scale;
    std::memcpy(row + j, &g, sizeof g);
  }
  const V g = exp_lanes<V, VI>(load_tail<V>(row + j, n - j, 0.f) - lse) * softmax_scale;
  for (int64_t k = 0; k < n - j; ++k) row[j + k] = g[k];
}

// One function per instruction set, picked once at load time.
__attribute__((target("arch=x86-64-v4"))) void row_max_sum_exp_avx512(const float* row, int64_t n, float* m, float* s) {
  row_max_sum_exp_impl<vec16, ivec16>(row, n, m, s);
}
__attribute__((target("arch=x86-64-v3"))) void row_max_sum_exp_avx2(const float* row, int64_t n, float* m, float* s) {
  row_max_sum_exp_impl<vec8, ivec8>(row, n, m, s);
}
void row_max_sum_exp_baseline(const float* row, int64_t n, float* m, float* s) {
  row_max_sum_exp_impl<vec8, ivec8>(row, n, m, s);
}
__attribute__((target("arch=x86-64-v4"))) void row_softmax_avx512(float* row, int64_t n, float lse, float scale) {
  row_softmax_impl<vec16, ivec16>(row, n, lse, scale);
}
__attribute__((target("arch=x86-64-v3"))) void row_softmax_avx2(float* row, int64_t n, float lse, float scale) {
  row_softmax_impl<vec8, ivec8>(row, n, lse, scale);
}
void row_softmax_baseline(float* row, int64_t n, float lse, float scale) {
  row_softmax_impl<vec8, ivec8>(row, n, lse, scale);
}

enum class Isa { avx512, avx2, baseline };
const Isa isa = [] {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
  return Isa::baseline;
}();
const auto row_max_sum_exp = isa == Isa::avx512 ? &row_max_sum_exp_avx512
                             : isa == Isa::avx2  ? &row_max_sum_exp_avx2
                                                 : &row_max_sum_exp_baseline;
const auto row_softmax = isa == Isa::avx512 ? &row_softmax_avx512
                         : isa == Isa::avx2  ? &row_softmax_avx2
                                             : &row_softmax_baseline;

void chunk_stats(const Floats& logits, const Ids& labels, Floats& max_out, Floats& sum_exp_out, Floats& target_out) {
  const Chunk c = chunk(logits, labels);
  check_per_token(max_out, c.tokens, "max");
  check_per_token(sum_exp_out, c.tokens, "sum_exp");
  check_per_token(target_out, c.tokens, "target");
  float *mx = max_out.mutable_data(), *se = sum_exp_out.mutable_data(), *tg = target_out.mutable_data();
  const float* z = logits.data();
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < c.tokens; ++i) {
    const float* row = z + i * c.vocab;
    row_max_sum_exp(row, c.vocab, mx + i, se + i);
    const int64_t label = c.labels[i];
    tg[i] = label >= 0 && label < c.vocab ? row[label] : 0.f;
  }
}

void chunk_gradient(Floats& logits, const Ids& labels, const Floats& lse, const Floats& softmax_scale,
                    const Floats& scale) {
  const Chunk c = chunk(logits, labels);
  check_per_token(lse, c.tokens, "lse");
  check_per_token(softmax_scale, c.tokens, "softmax_scale");
  check_per_token(scale, c.tokens, "scale");
  const float *l = lse.data(), *ss = softmax_scale.data(), *s = scale.data();
  float* data = logits.mutable_data();
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < c.tokens; ++i) {
    float* row = data + i * c.vocab;
    row_softmax(row, c.vocab, l[i], ss[i]);
    const int64_t label = c.labels[i];
    if (label >= 0 && label < c.vocab) row[label] -= s[i];
  }
}

}  // namespace

void register_linear_cross_entropy(py::module_& m) {
  m.def("lce_chunk_stats", &chunk_stats, py::arg("logits"), py::arg("labels"), py::arg("max"), py::arg("sum_exp"),
        py::arg("target"), "per-token max logit, sum of exp(logit - max) and label logit over a vocabulary slice");
  m.def("lce_chunk_gradient", &chunk_gradient, py::arg("logits"), py::arg("labels"), py::arg("lse"),
        py::arg("softmax_scale"), py::arg("scale"),
        "in place: logits -> exp(logit - lse) * softmax_scale - [label] * scale");
}
