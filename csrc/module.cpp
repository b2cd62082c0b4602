// megatron_adapt._native: the CPU kernels of csrc/, one registration function per file.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_vocab_embedding(py::module_& m);
void register_chunk_encoder(py::module_& m);
void register_linear_cross_entropy(py::module_& m);

PYBIND11_MODULE(_native, m) {
  m.doc() = "megatron-adapt CPU kernels";
  register_vocab_embedding(m);
  register_chunk_encoder(m);
  register_linear_cross_entropy(m);
}
