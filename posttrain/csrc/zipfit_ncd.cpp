// ZIP-FIT's compressed sizes for a whole pool in one call: C(t) of every target chunk, C(x) of every row and
// C(t x) of every (chunk, row) pair, with the zlib calls data_recipes/zipfit.py's CompressionScorer makes from
// Python, in the same order, so the sizes are byte-identical (same library, same settings, same flushes):
//   C(t)   = compressobj(level, DEFLATED, -window_bits, mem_level): compress(t), flush(Z_SYNC_FLUSH)
//   C(t x) = C(t) + what a deflateCopy of that primed stream emits for compress(x), flush(Z_SYNC_FLUSH)
//   C(x)   = one stream for all rows: compress(x), flush(Z_FULL_FLUSH) (a full flush forgets the history)
// What the Python path pays per row (two Python calls, output bytes objects, a malloc'd state copy) is gone:
// the copies come from a bump arena reset per row, the output goes to one reused buffer and only its length
// is kept. Rows are str (their UTF-8, as str.encode() gives) or bytes. Single-threaded unless `threads` > 1.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

// zlib allocator: malloc while `bump` is false (the primed streams, kept for the whole call); a bump pointer
// into one block while it is true (a row's state copy, dropped by `reset`). A copy needs ~23 KiB at the default
// settings and < 0.5 MiB at the largest (15-bit window, mem_level 9); 1 MiB always fits, malloc is the overflow.
struct Arena {
  static constexpr size_t kCapacity = 1 << 20;
  std::vector<unsigned char> block = std::vector<unsigned char>(kCapacity);
  size_t used = 0;
  bool bump = false;

  void reset() { used = 0; }
};

voidpf arena_alloc(voidpf opaque, uInt items, uInt size) {
  auto* arena = static_cast<Arena*>(opaque);
  const size_t bytes = (static_cast<size_t>(items) * size + 63) & ~static_cast<size_t>(63);
  if (arena->bump && arena->used + bytes <= Arena::kCapacity) {
    void* pointer = arena->block.data() + arena->used;
    arena->used += bytes;
    return pointer;
  }
  return std::malloc(bytes);
}

void arena_free(voidpf opaque, voidpf pointer) {
  auto* arena = static_cast<Arena*>(opaque);
  const auto* bytes = static_cast<unsigned char*>(pointer);
  if (bytes < arena->block.data() || bytes >= arena->block.data() + Arena::kCapacity) std::free(pointer);
}

struct Settings {
  int level, window_bits, mem_level;
};

struct Text {
  const char* data;
  size_t size;
};

// One thread's state: its arena, its primed streams (one per target chunk) and its C(x) stream.
class Worker {
 public:
  Worker(const std::vector<Text>& chunks, const Settings& settings) : settings_(settings) {
    primed_.resize(chunks.size());
    for (size_t k = 0; k < chunks.size(); ++k) {
      init(primed_[k]);
      target_sizes_.push_back(compress_and_flush(primed_[k], chunks[k], Z_SYNC_FLUSH));
    }
    init(rows_);
    arena_.bump = true;  // from here on only per-row copies allocate
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  ~Worker() {
    arena_.bump = false;
    for (auto& stream : primed_) deflateEnd(&stream);
    deflateEnd(&rows_);
  }

  const std::vector<int64_t>& target_sizes() const { return target_sizes_; }

  // C(x) into row_sizes[i] and C(t_k x) into joint_sizes[k * n + i] for rows [begin, end).
  void score(const std::vector<Text>& rows, size_t begin, size_t end, int64_t* row_sizes, int64_t* joint_sizes) {
    const size_t n = rows.size();
    for (size_t i = begin; i < end; ++i) {
      row_sizes[i] = compress_and_flush(rows_, rows[i], Z_FULL_FLUSH);
      for (size_t k = 0; k < primed_.size(); ++k) {
        arena_.reset();
        z_stream copy;
        check(deflateCopy(&copy, &primed_[k]), "deflateCopy");
        joint_sizes[k * n + i] = target_sizes_[k] + compress_and_flush(copy, rows[i], Z_SYNC_FLUSH);
        deflateEnd(&copy);  // frees nothing: its memory is the arena's
      }
    }
  }

 private:
  static void check(int status, const char* call) {
    if (status != Z_OK) throw std::runtime_error(std::string("zlib ") + call + " failed with status " +
                                                 std::to_string(status));
  }

  void init(z_stream& stream) {
    stream = z_stream{};
    stream.zalloc = arena_alloc;
    stream.zfree = arena_free;
    stream.opaque = &arena_;
    check(deflateInit2(&stream, settings_.level, Z_DEFLATED, -settings_.window_bits, settings_.mem_level,
                       Z_DEFAULT_STRATEGY),
          "deflateInit2");
  }

  // Bytes emitted by deflate(text, Z_NO_FLUSH) then deflate(nothing, flush), each repeated while the output
  // buffer fills up: the calls CPython's compressobj.compress(text) and .flush(flush) make. Only lengths are kept.
  int64_t compress_and_flush(z_stream& stream, const Text& text, int flush) {
    int64_t total = 0;
    stream.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(text.data));
    stream.avail_in = static_cast<uInt>(text.size);
    for (const int mode : {Z_NO_FLUSH, flush}) {
      do {
        stream.next_out = output_.data();
        stream.avail_out = static_cast<uInt>(output_.size());
        if (deflate(&stream, mode) == Z_STREAM_ERROR) throw std::runtime_error("zlib deflate: stream error");
        total += static_cast<int64_t>(output_.size() - stream.avail_out);
      } while (stream.avail_out == 0);
    }
    return total;
  }

  Settings settings_;
  Arena arena_;
  std::vector<z_stream> primed_;
  z_stream rows_{};
  std::vector<int64_t> target_sizes_;
  std::vector<Bytef> output_ = std::vector<Bytef>(1 << 16);
};

// The UTF-8 bytes of a str (CPython's cached form: no copy for ASCII) or the bytes of a bytes object.
Text text_of(PyObject* item, size_t index, const char* what) {
  Py_ssize_t size = 0;
  const char* data = nullptr;
  if (PyUnicode_Check(item)) {
    data = PyUnicode_AsUTF8AndSize(item, &size);
    if (data == nullptr) throw py::error_already_set();
  } else if (PyBytes_Check(item)) {
    data = PyBytes_AS_STRING(item);
    size = PyBytes_GET_SIZE(item);
  } else {
    throw py::type_error(std::string(what) + " " + std::to_string(index) + " is a " + Py_TYPE(item)->tp_name +
                         "; expected str or bytes");
  }
  if (static_cast<uint64_t>(size) >= (uint64_t{1} << 32)) {
    throw py::value_error(std::string(what) + " " + std::to_string(index) + " is 4 GiB or longer: split it");
  }
  return {data, static_cast<size_t>(size)};
}

std::vector<Text> texts_of(const py::tuple& items, const char* what) {
  std::vector<Text> out;
  out.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) out.push_back(text_of(items[i].ptr(), i, what));
  return out;
}

py::tuple compressed_sizes(const py::sequence& chunk_sequence, const py::sequence& row_sequence, int level,
                           int window_bits, int mem_level, int threads) {
  if (level < 0 || level > 9 || window_bits < 9 || window_bits > 15 || mem_level < 1 || mem_level > 9) {
    throw py::value_error("level must be in 0..9, window_bits in 9..15 and mem_level in 1..9");
  }
  if (threads < 1) throw py::value_error("threads must be >= 1");
  // Tuples hold a reference to every text, so the pointers stay valid while the GIL is released.
  const py::tuple chunk_tuple(chunk_sequence), row_tuple(row_sequence);
  const std::vector<Text> chunks = texts_of(chunk_tuple, "target chunk"), rows = texts_of(row_tuple, "row");
  const size_t n = rows.size(), k = chunks.size();
  py::array_t<int64_t> target_sizes(static_cast<py::ssize_t>(k)), row_sizes(static_cast<py::ssize_t>(n));
  py::array_t<int64_t> joint_sizes({static_cast<py::ssize_t>(k), static_cast<py::ssize_t>(n)});
  int64_t* row_out = row_sizes.mutable_data();
  int64_t* joint_out = joint_sizes.mutable_data();
  const Settings settings{level, window_bits, mem_level};
  std::vector<int64_t> targets;
  const size_t workers = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(threads), n));
  std::vector<std::string> errors(workers);
  {
    py::gil_scoped_release release;
    auto run = [&](size_t w) {
      try {
        Worker worker(chunks, settings);
        if (w == 0) targets = worker.target_sizes();
        worker.score(rows, n * w / workers, n * (w + 1) / workers, row_out, joint_out);
      } catch (const std::exception& error) {
        errors[w] = error.what();
      }
    };
    std::vector<std::thread> pool;
    for (size_t w = 1; w < workers; ++w) pool.emplace_back(run, w);
    run(0);
    for (auto& thread : pool) thread.join();
  }
  for (const auto& error : errors) {
    if (!error.empty()) throw std::runtime_error(error);
  }
  std::copy(targets.begin(), targets.end(), target_sizes.mutable_data());
  return py::make_tuple(target_sizes, row_sizes, joint_sizes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ZIP-FIT's DEFLATE sizes C(t), C(x), C(t x) for a whole pool (data_recipes/zipfit.py)";
  m.def("compressed_sizes", &compressed_sizes, py::arg("chunks"), py::arg("rows"), py::arg("level"),
        py::arg("window_bits"), py::arg("mem_level"), py::arg("threads") = 1,
        "(C(t) [chunks], C(x) [rows], C(t x) [chunks, rows]) as int64 numpy arrays; rows are str (UTF-8) or bytes");
}
