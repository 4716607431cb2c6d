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

// ---- The fixed-code DEFLATE sizes (data_recipes/fixed_deflate.py is the twin and documents the parse) ----
// Greedy LZ77 over the 3-byte keys, the `max_chain` most recent candidates within `max_dist`, sizes summed from
// the fixed Huffman code lengths: no trees and no output, so a short row costs well under a microsecond.
constexpr int kMinMatch = 3, kMaxMatch = 258, kHashBits = 15, kBlockBits = 3 + 7;
constexpr int kLengthBase[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
constexpr int kLengthExtra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
constexpr int kDistanceBase[30] = {1,   2,   3,   4,   5,   7,    9,    13,   17,   25,   33,   49,   65,    97,    129,
                                   193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
constexpr int kDistanceExtra[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

struct BitTables {
  int length[kMaxMatch + 1] = {};  // bits of a match length's code + extra bits
  int distance[32769] = {};        // bits of a distance's code (5) + extra bits
  BitTables() {
    for (int n = kMinMatch; n <= kMaxMatch; ++n) {
      int code = 0;
      while (code + 1 < 28 && kLengthBase[code + 1] <= n) ++code;
      if (n == kMaxMatch) code = 28;
      length[n] = (257 + code <= 279 ? 7 : 8) + kLengthExtra[code];
    }
    for (int d = 1; d <= 32768; ++d) {
      int code = 0;
      while (code + 1 < 30 && kDistanceBase[code + 1] <= d) ++code;
      distance[d] = 5 + kDistanceExtra[code];
    }
  }
};
const BitTables kBits;

inline uint32_t key_of(const unsigned char* p) { return (uint32_t{p[0]} << 16) | (uint32_t{p[1]} << 8) | p[2]; }
inline uint32_t hash_of(uint32_t key) { return (key * 2654435761u) >> (32 - kHashBits); }

// A target chunk's hash chains (positions whose 3 bytes lie wholly in the chunk), built once, read-only.
struct ChunkChains {
  std::vector<int32_t> head = std::vector<int32_t>(1 << kHashBits, -1), previous;
  int64_t bits = 0;
};

// One thread's parser: a buffer holding chunk + row, and row-local chains (stamped, so never cleared).
class FixedParser {
 public:
  FixedParser(int max_dist, int max_chain) : max_dist_(max_dist), max_chain_(max_chain) {}

  // Bits of the greedy parse of buffer_[start, total); matches may reach into buffer_[0, start) through `chunk`.
  int64_t parse_bits(size_t start, size_t total, const ChunkChains* chunk) {
    const unsigned char* data = buffer_.data();
    ++stamp_;
    if (local_previous_.size() < total) local_previous_.resize(total);
    const size_t first_local = start >= 2 ? start - 2 : 0;
    auto insert = [&](size_t position) {
      if (position + kMinMatch > total) return;
      const uint32_t h = hash_of(key_of(data + position));
      local_previous_[position] = stamps_[h] == stamp_ ? local_head_[h] : -1;
      local_head_[h] = static_cast<int32_t>(position);
      stamps_[h] = stamp_;
    };
    for (size_t position = first_local; position < start; ++position) insert(position);
    int64_t bits = 0;
    size_t i = start;
    while (i < total) {
      int best_length = 0, best_distance = 0;
      if (i + kMinMatch <= total) {
        const uint32_t key = key_of(data + i), h = hash_of(key);
        const int limit = static_cast<int>(std::min<size_t>(kMaxMatch, total - i));
        int seen = 0;
        auto scan = [&](int32_t p, const int32_t* previous) {  // false: stop the whole search
          for (; p >= 0; p = previous[p]) {
            if (static_cast<int64_t>(i) - p > max_dist_ || seen == max_chain_) return false;
            if (key_of(data + p) != key) continue;  // a hash collision is not a candidate
            ++seen;
            int length = kMinMatch;
            while (length < limit && data[p + length] == data[i + length]) ++length;
            if (length > best_length) best_length = length, best_distance = static_cast<int>(i - p);
            if (length == limit) return false;
          }
          return true;
        };
        if (scan(stamps_[h] == stamp_ ? local_head_[h] : -1, local_previous_.data()) && chunk != nullptr) {
          scan(chunk->head[h], chunk->previous.data());
        }
      }
      if (best_length >= kMinMatch) {
        bits += kBits.length[best_length] + kBits.distance[best_distance];
        for (size_t position = i; position < i + best_length; ++position) insert(position);
        i += best_length;
      } else {
        bits += data[i] < 144 ? 8 : 9;
        insert(i);
        ++i;
      }
    }
    return bits;
  }

  ChunkChains chains_of(const Text& chunk) {
    ChunkChains chains;
    chains.previous.assign(chunk.size, -1);
    const auto* data = reinterpret_cast<const unsigned char*>(chunk.data);
    for (size_t p = 0; p + kMinMatch <= chunk.size; ++p) {
      const uint32_t h = hash_of(key_of(data + p));
      chains.previous[p] = chains.head[h];
      chains.head[h] = static_cast<int32_t>(p);
    }
    load(nullptr, chunk);
    chains.bits = parse_bits(0, chunk.size, nullptr);
    return chains;
  }

  // buffer_ = prefix + text; returns the length of the prefix.
  size_t load(const Text* prefix, const Text& text) {
    const size_t start = prefix == nullptr ? 0 : prefix->size;
    buffer_.resize(start + text.size);
    if (prefix != nullptr) std::copy(prefix->data, prefix->data + start, reinterpret_cast<char*>(buffer_.data()));
    std::copy(text.data, text.data + text.size, reinterpret_cast<char*>(buffer_.data()) + start);
    return start;
  }

  size_t size() const { return buffer_.size(); }

 private:
  int max_dist_, max_chain_;
  std::vector<unsigned char> buffer_;
  std::vector<int32_t> local_head_ = std::vector<int32_t>(1 << kHashBits, -1), local_previous_;
  std::vector<uint32_t> stamps_ = std::vector<uint32_t>(1 << kHashBits, 0);
  uint32_t stamp_ = 0;
};

inline int64_t stream_bytes(int64_t bits) { return (kBlockBits + bits + 7) / 8; }

py::tuple fixed_deflate_sizes(const py::sequence& chunk_sequence, const py::sequence& row_sequence, int window_bits,
                              int max_chain, int threads) {
  if (window_bits < 9 || window_bits > 15 || max_chain < 1 || threads < 1) {
    throw py::value_error("window_bits must be in 9..15, max_chain >= 1 and threads >= 1");
  }
  const int max_dist = (1 << window_bits) - 262;
  const py::tuple chunk_tuple(chunk_sequence), row_tuple(row_sequence);
  const std::vector<Text> chunks = texts_of(chunk_tuple, "target chunk"), rows = texts_of(row_tuple, "row");
  for (const auto& chunk : chunks) {
    if (chunk.size > static_cast<size_t>(max_dist)) throw py::value_error("a target chunk is longer than the window");
  }
  const size_t n = rows.size(), k = chunks.size();
  py::array_t<int64_t> target_sizes(static_cast<py::ssize_t>(k)), row_sizes(static_cast<py::ssize_t>(n));
  py::array_t<int64_t> joint_sizes({static_cast<py::ssize_t>(k), static_cast<py::ssize_t>(n)});
  int64_t* target_out = target_sizes.mutable_data();
  int64_t* row_out = row_sizes.mutable_data();
  int64_t* joint_out = joint_sizes.mutable_data();
  std::vector<ChunkChains> chains;
  {
    FixedParser parser(max_dist, max_chain);
    for (size_t c = 0; c < k; ++c) {
      chains.push_back(parser.chains_of(chunks[c]));
      target_out[c] = stream_bytes(chains.back().bits);
    }
  }
  const size_t workers = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(threads), n));
  {
    py::gil_scoped_release release;
    auto run = [&](size_t w) {
      FixedParser parser(max_dist, max_chain);
      for (size_t i = n * w / workers; i < n * (w + 1) / workers; ++i) {
        parser.load(nullptr, rows[i]);
        row_out[i] = stream_bytes(parser.parse_bits(0, parser.size(), nullptr));
        for (size_t c = 0; c < k; ++c) {
          const size_t start = parser.load(&chunks[c], rows[i]);
          joint_out[c * n + i] = stream_bytes(chains[c].bits + parser.parse_bits(start, parser.size(), &chains[c]));
        }
      }
    };
    std::vector<std::thread> pool;
    for (size_t w = 1; w < workers; ++w) pool.emplace_back(run, w);
    run(0);
    for (auto& thread : pool) thread.join();
  }
  return py::make_tuple(target_sizes, row_sizes, joint_sizes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ZIP-FIT's DEFLATE sizes C(t), C(x), C(t x) for a whole pool (data_recipes/zipfit.py)";
  m.def("compressed_sizes", &compressed_sizes, py::arg("chunks"), py::arg("rows"), py::arg("level"),
        py::arg("window_bits"), py::arg("mem_level"), py::arg("threads") = 1,
        "(C(t) [chunks], C(x) [rows], C(t x) [chunks, rows]) as int64 numpy arrays; rows are str (UTF-8) or bytes");
  m.def("fixed_deflate_sizes", &fixed_deflate_sizes, py::arg("chunks"), py::arg("rows"), py::arg("window_bits"),
        py::arg("max_chain"), py::arg("threads") = 1,
        "the same triple for DEFLATE with fixed Huffman codes and a greedy parse (data_recipes/fixed_deflate.py)");
}
