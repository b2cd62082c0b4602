// CPU kernels of the two-table vocab-range embedding lookup (megatron_adapt.kernels.embedding).
//
// A tensor-parallel rank owns rows [start, start + rows) of the vocabulary, held in two tables:
// `table` has all rows of the slice (the frozen ones are read from it) and `trainable` has rows
// [t0, t0 + trainable rows) of the slice — the added vocabulary in stage 1, everything in stage 2.
// Forward writes the row of each id it owns and zeros for the others (the TP all-reduce then
// sums the ranks); backward adds each token's output gradient into the trainable row of its id
// and nothing anywhere else. Backward is split over hidden-dimension blocks, not tokens, so
// threads never write the same element and the sums are taken in token order: the result is
// deterministic and independent of the thread count.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace py = pybind11;
using Ids = py::array_t<int64_t, py::array::c_style>;
using Matrix = py::array_t<float, py::array::c_style>;

namespace {

void check_matrix(const Matrix& m, const char* name, int64_t rows, int64_t cols) {
  if (m.ndim() != 2 || m.shape(0) != rows || m.shape(1) != cols) {
    throw std::invalid_argument(std::string(name) + " has the wrong shape");
  }
}

void forward(const Ids& ids, const Matrix& table, const Matrix& trainable, int64_t start, int64_t t0,
             Matrix& out) {
  const int64_t n = ids.size(), rows = table.shape(0), hidden = table.shape(1), t_rows = trainable.shape(0);
  check_matrix(out, "out", n, hidden);
  check_matrix(trainable, "trainable", t_rows, hidden);
  if (t0 < 0 || t0 + t_rows > rows) throw std::invalid_argument("trainable rows outside the slice");
  const int64_t* id = ids.data();
  const float* w = table.data();
  const float* tw = trainable.data();
  float* o = out.mutable_data();
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = id[i] - start;
    float* dst = o + i * hidden;
    if (row >= t0 && row < t0 + t_rows) {
      std::memcpy(dst, tw + (row - t0) * hidden, sizeof(float) * hidden);
    } else if (row >= 0 && row < rows) {
      std::memcpy(dst, w + row * hidden, sizeof(float) * hidden);
    } else {
      std::memset(dst, 0, sizeof(float) * hidden);
    }
  }
}

void backward(const Ids& ids, const Matrix& grad_out, int64_t start, int64_t t0, Matrix& grad_weight) {
  const int64_t n = ids.size(), rows = grad_weight.shape(0), hidden = grad_weight.shape(1);
  check_matrix(grad_out, "grad_out", n, hidden);
  const int64_t* id = ids.data();
  const float* g = grad_out.data();
  float* gw = grad_weight.mutable_data();
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (hidden + kBlock - 1) / kBlock;
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock, hi = lo + kBlock < hidden ? lo + kBlock : hidden;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = id[i] - start - t0;
      if (row < 0 || row >= rows) continue;
      float* dst = gw + row * hidden;
      const float* src = g + i * hidden;
      for (int64_t j = lo; j < hi; ++j) dst[j] += src[j];
    }
  }
}

}  // namespace

void register_vocab_embedding(py::module_& m) {
  m.def("vocab_embedding_forward", &forward, py::arg("ids"), py::arg("table"), py::arg("trainable"),
        py::arg("start"), py::arg("t0"), py::arg("out"),
        "out[i] = row ids[i] - start of the slice (from `trainable` for rows [t0, t0 + len)), else 0");
  m.def("vocab_embedding_backward", &backward, py::arg("ids"), py::arg("grad_out"), py::arg("start"),
        py::arg("t0"), py::arg("grad_trainable"),
        "grad_trainable[ids[i] - start - t0] += grad_out[i] for ids of trainable rows (deterministic)");
}
