// Cached chunk encoding for SentencePiece BPE models whose pieces never span a space boundary.
//
// SentencePiece escapes ' ' as U+2581 and LLaMA-style models have no piece with U+2581 after a
// non-space character, so no merge crosses the point where a space follows a non-space. A text
// therefore encodes as the concatenation of its chunks (a run of spaces plus the run of
// non-spaces after it), each encoded alone with the dummy prefix off; the first chunk of a text
// gets the dummy prefix as an extra leading space. Natural text repeats its chunks (words) so
// often that a cache answers almost every lookup; only unseen chunks go to SentencePiece, in one
// batch per call. Splitting, lookups and assembling the ids run here without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace py = pybind11;

namespace {

using Ids = std::vector<int32_t>;

// The chunks of `text`, as keys: the first one with the dummy-prefix space in front.
void split_chunks(const std::string& text, bool dummy_prefix, std::vector<std::string>& out) {
  size_t start = 0, i = 0;
  const size_t n = text.size();
  while (i < n) {
    while (i < n && text[i] == ' ') ++i;  // the spaces that open this chunk
    while (i < n && text[i] != ' ') ++i;  // the word after them
    std::string key = (start == 0 && dummy_prefix) ? " " : "";
    key.append(text, start, i - start);
    out.push_back(std::move(key));
    start = i;
  }
}

class ChunkEncoder {
 public:
  ChunkEncoder(bool dummy_prefix, size_t max_entries, size_t max_chunk_bytes)
      : dummy_prefix_(dummy_prefix), max_entries_(max_entries), max_chunk_bytes_(max_chunk_bytes) {}

  // Encode `texts`; `encode_missing(list[str]) -> list[list[int]]` encodes chunks not cached.
  // Returns (ids: int32[total], lengths: int64[len(texts)]).
  py::tuple encode(const std::vector<std::string>& texts, const py::function& encode_missing) {
    std::vector<std::vector<std::string>> chunks(texts.size());
    std::vector<std::string> missing;
    {
      py::gil_scoped_release release;
      std::unordered_set<std::string> seen;
      for (size_t t = 0; t < texts.size(); ++t) {
        split_chunks(texts[t], dummy_prefix_, chunks[t]);
        for (const auto& c : chunks[t]) {
          if (cache_.find(c) == cache_.end() && seen.insert(c).second) missing.push_back(c);
        }
      }
    }
    std::unordered_map<std::string, Ids> local;  // this call's chunks that the cache does not keep
    if (!missing.empty()) {
      auto encoded = encode_missing(missing).cast<std::vector<Ids>>();
      if (encoded.size() != missing.size()) throw std::runtime_error("encode_missing returned a wrong count");
      for (size_t k = 0; k < missing.size(); ++k) {
        auto& target = (cache_.size() < max_entries_ && missing[k].size() <= max_chunk_bytes_) ? cache_ : local;
        target.emplace(std::move(missing[k]), std::move(encoded[k]));
      }
    }
    py::array_t<int64_t> lengths(texts.size());
    auto len = lengths.mutable_unchecked<1>();
    std::vector<std::vector<const Ids*>> parts(texts.size());
    size_t total = 0;
    {
      py::gil_scoped_release release;
      for (size_t t = 0; t < texts.size(); ++t) {
        int64_t n = 0;
        for (const auto& c : chunks[t]) {
          auto it = cache_.find(c);
          const Ids* ids = it != cache_.end() ? &it->second : &local.at(c);
          parts[t].push_back(ids);
          n += static_cast<int64_t>(ids->size());
        }
        len(t) = n;
        total += n;
      }
    }
    py::array_t<int32_t> flat(total);
    int32_t* out = flat.mutable_data();
    {
      py::gil_scoped_release release;
      for (const auto& doc : parts) {
        for (const Ids* ids : doc) {
          std::copy(ids->begin(), ids->end(), out);
          out += ids->size();
        }
      }
    }
    return py::make_tuple(flat, lengths);
  }

  size_t cache_size() const { return cache_.size(); }

 private:
  bool dummy_prefix_;
  size_t max_entries_, max_chunk_bytes_;
  std::unordered_map<std::string, Ids> cache_;
};

}  // namespace

void register_chunk_encoder(py::module_& m) {
  py::class_<ChunkEncoder>(m, "ChunkEncoder")
      .def(py::init<bool, size_t, size_t>(), py::arg("dummy_prefix"), py::arg("max_entries"),
           py::arg("max_chunk_bytes"))
      .def("encode", &ChunkEncoder::encode, py::arg("texts"), py::arg("encode_missing"))
      .def_property_readonly("cache_size", &ChunkEncoder::cache_size);
}
