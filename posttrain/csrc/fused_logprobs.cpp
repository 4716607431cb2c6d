// Fused lm-head projection + log-softmax gather + entropy on CPU, without materialising [N, V] logits.
//
// Ops (schemas below, Python side in posttrain/ops/fused.py):
//   posttrain::fused_linear_logprobs_forward(hidden [N,H], weight [V,H], targets [N] int64, bias [V]?,
//       temperature, ignore_index) -> (logprobs [N], entropy [N], lse [N], mean_logit [N])   all float32
//   posttrain::fused_linear_logprobs_backward(grad_logprobs [N], grad_entropy [N], hidden, weight, targets,
//       bias?, lse, mean_logit, temperature, ignore_index, hidden_requires_grad, weight_requires_grad,
//       bias_requires_grad) -> (grad_hidden [N,H] | [0], grad_weight [V,H] | [0], grad_bias [V] | [0])
//
// Maths, with z = (hidden @ weight^T + bias) / T the temperature-scaled logits of one row:
//   forward keeps, per row, an online log-sum-exp over vocabulary tiles: running max m,
//   Z = sum_v e^(z_v - m) and D = sum_v (z_v - m) e^(z_v - m) (D is B - m Z for B = sum z e^(z - m); shifting
//   by m keeps entropy free of cancellation when logits are large). Then
//   lse = m + log Z, mean_logit = E_p[z] = m + D / Z, logprob = z_y - lse, entropy = lse - E_p[z] = log Z - D / Z.
//   backward recomputes each tile: p = e^(z - lse),
//   dL/dz_v = g_logp (onehot(y)_v - p_v) - g_H p_v (z_v - E_p[z]); dL/d(raw logit) = (dL/dz) / T, so the 1/T is
//   folded into the per-row coefficients; grad_hidden += dlogits W, grad_weight += dlogits^T h, grad_bias += sum.
// Rows whose target is ignore_index are dropped up front: their outputs are 0 and they get no gradient.
//
// Memory: besides inputs and outputs, a call holds O(N) row statistics, an fp32 copy of the active hidden rows
// when hidden is not fp32 or some rows are ignored ([n, H]), and per thread one [kTokenBlock, kVocabTile] fp32
// logits tile plus a converted weight tile; backward adds one fp32 [n, H] grad_hidden accumulator per thread
// (or, when the vocabulary has fewer tiles than threads, one fp32 [V, H] grad_weight accumulator per thread,
// V < threads * kVocabTile). bf16 / fp16 inputs are converted tile by tile to fp32; all accumulation is fp32.
// Needs -fopenmp (at::parallel_for is an OpenMP template) and -fno-trapping-math (vectorised row loops).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "softmax_rows.h"  // LogSumExpStats, exp_for_softmax, row_kernels()

namespace posttrain {

// Shape / dtype / device / temperature checks shared with the CUDA binding (csrc/cuda/fused_logprobs_cuda.cpp).
void check_fused_logprobs_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                 const std::optional<at::Tensor>& bias, double temperature) {
  TORCH_CHECK(hidden.dim() == 2, "fused_linear_logprobs: hidden must be [N, H], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1),
              "fused_linear_logprobs: weight must be [V, H] with H = ", hidden.size(1), ", got shape ",
              weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "fused_linear_logprobs: targets must be [N] with N = ", hidden.size(0), ", got shape ",
              targets.sizes());
  TORCH_CHECK(weight.size(0) > 0, "fused_linear_logprobs: weight has an empty vocabulary (shape ", weight.sizes(),
              ")");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "fused_linear_logprobs: targets must be int64, got ",
              targets.scalar_type(), "; pass targets.long()");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()) && at::isFloatingType(weight.scalar_type()),
              "fused_linear_logprobs: hidden and weight must be floating point, got ", hidden.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(hidden.device() == weight.device() && hidden.device() == targets.device(),
              "fused_linear_logprobs: hidden, weight and targets must be on one device, got ", hidden.device(),
              ", ", weight.device(), ", ", targets.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "fused_linear_logprobs: bias must be [V] with V = ", weight.size(0), ", got shape ",
                bias->sizes());
    TORCH_CHECK(bias->device() == weight.device(), "fused_linear_logprobs: bias is on ", bias->device(),
                " but weight is on ", weight.device());
  }
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature),
              "fused_linear_logprobs: temperature must be a positive finite number, got ", temperature);
}

namespace {

using at::Tensor;

// A [kTokenBlock, kVocabTile] fp32 tile is 1 MiB, so the GEMM that writes it and the row loops that read it
// share a core's L2. On the 2-core AVX2 dev machine single-threaded MKL ran these tile GEMMs at 83-87 GFLOP/s,
// and 512 x 512 or 1024 x 1024 tiles timed the same as 256 x 1024 within the (shared machine's) noise.
constexpr int64_t kTokenBlock = 256;
constexpr int64_t kVocabTile = 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs `worker(claim_item)` on each intra-op thread (at most num_items of them). `claim_item()` hands out
// item indices one at a time and returns >= num_items when none are left, so a thread slowed down by other
// processes on the machine takes fewer items instead of every call waiting for it, as with a static split.
template <typename Worker>
void run_workers(int64_t num_items, const Worker& worker) {
  std::atomic<int64_t> next_item{0};
  const auto claim_item = [&next_item]() { return next_item.fetch_add(1, std::memory_order_relaxed); };
  const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_items);
  // OpenMP threads do not inherit the caller's thread-local dispatch state (e.g. autograd excluded); copy it.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
    const at::ThreadLocalStateGuard caller_state_guard(caller_state);
    for (int64_t worker_index = worker_begin; worker_index < worker_end; ++worker_index) worker(claim_item);
  });
}

// The rows that take part in the computation: those whose target is not ignore_index.
struct ActiveRows {
  Tensor index;    // [n] int64 row positions in the full batch; undefined when every row is active
  Tensor hidden;   // [n, H] fp32, contiguous
  Tensor targets;  // [n] int64, contiguous, each in [0, V)
  int64_t count() const { return targets.size(0); }
  // Per-active-row values [n, ...] placed back into a batch-sized tensor, zero on ignored rows.
  Tensor scatter(const Tensor& active_values, int64_t batch_rows) const {
    if (!index.defined()) return active_values;
    auto sizes = active_values.sizes().vec();
    sizes[0] = batch_rows;
    return at::zeros(sizes, active_values.options()).index_copy_(0, index, active_values);
  }
};

ActiveRows select_active_rows(const Tensor& hidden, const Tensor& targets, int64_t ignore_index,
                              int64_t vocab_size) {
  ActiveRows active;
  const Tensor keep = targets.ne(ignore_index);
  const int64_t n = keep.sum().item<int64_t>();
  if (n == targets.size(0)) {
    active.hidden = hidden.to(at::kFloat).contiguous();  // no copy when hidden is already contiguous fp32
    active.targets = targets.contiguous();
  } else {
    active.index = keep.nonzero().squeeze(1);
    active.hidden = hidden.index_select(0, active.index).to(at::kFloat).contiguous();
    active.targets = targets.index_select(0, active.index).contiguous();
  }
  if (n > 0) {
    const auto [lowest, highest] = at::aminmax(active.targets);
    const int64_t lowest_target = lowest.item<int64_t>(), highest_target = highest.item<int64_t>();
    TORCH_CHECK(lowest_target >= 0 && highest_target < vocab_size, "fused_linear_logprobs: targets must lie in [0, ",
                vocab_size, ") or equal ignore_index = ", ignore_index, ", got values in [", lowest_target, ", ",
                highest_target, "]");
  }
  return active;
}

// One vocabulary tile of the weight (and bias), converted to fp32 once and reused for every token block.
struct VocabTile {
  int64_t start = 0;
  int64_t width = 0;
  Tensor weight;  // [width, H] fp32
  Tensor bias;    // [width] fp32, or undefined
};

VocabTile load_vocab_tile(const Tensor& weight, const std::optional<Tensor>& bias, int64_t tile_index) {
  VocabTile tile;
  tile.start = tile_index * kVocabTile;
  tile.width = std::min(kVocabTile, weight.size(0) - tile.start);
  tile.weight = weight.narrow(0, tile.start, tile.width).to(at::kFloat);
  if (bias.has_value()) tile.bias = bias->narrow(0, tile.start, tile.width).to(at::kFloat);
  return tile;
}

// Temperature-scaled logits z = (h W_tile^T + b_tile) / T of one token block, written into `buffer`
// (a thread's scratch of kTokenBlock * kVocabTile floats). Returns the [rows, width] contiguous view.
Tensor compute_logits_tile(const Tensor& buffer, const Tensor& hidden_block, const VocabTile& tile,
                           double inv_temperature) {
  Tensor logits = buffer.narrow(0, 0, hidden_block.size(0) * tile.width).view({hidden_block.size(0), tile.width});
  if (tile.bias.defined()) {
    at::addmm_out(logits, tile.bias, hidden_block, tile.weight.t(), inv_temperature, inv_temperature);
  } else {
    at::mm_out(logits, hidden_block, tile.weight.t());
    if (inv_temperature != 1.0) logits.mul_(inv_temperature);
  }
  return logits;
}

// Folds `other` into `into`; both describe disjoint sets of logits of the same row.
inline void merge_stats(LogSumExpStats& into, const LogSumExpStats& other) {
  if (other.sum_exp == 0.0f) return;
  if (into.sum_exp == 0.0f) {
    into = other;
    return;
  }
  const float new_max = std::max(into.max, other.max);
  const float into_scale = std::exp(into.max - new_max);
  const float other_scale = std::exp(other.max - new_max);
  // Re-centre each D on new_max: sum (z - M) e^(z - M) = e^(m - M) (D + (m - M) Z).
  into.shifted_dot = into_scale * (into.shifted_dot + (into.max - new_max) * into.sum_exp) +
                     other_scale * (other.shifted_dot + (other.max - new_max) * other.sum_exp);
  into.sum_exp = into_scale * into.sum_exp + other_scale * other.sum_exp;
  into.max = new_max;
}

// Folds a logits tile [rows, width] into the running statistics of its rows and records z_y for rows whose
// target falls in the tile.
void fold_logits_tile(const Tensor& logits, LogSumExpStats* row_stats, const int64_t* row_targets,
                      float* target_logits, int64_t vocab_start) {
  const int64_t rows = logits.size(0), width = logits.size(1);
  const float* logits_data = logits.data_ptr<float>();
  const RowKernels& kernels = row_kernels();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits_data + r * width;
    const int64_t column = row_targets[r] - vocab_start;
    if (column >= 0 && column < width) target_logits[r] = row[column];
    merge_stats(row_stats[r], kernels.stats(row, width));
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_linear_logprobs_forward_cpu(
    const Tensor& hidden, const Tensor& weight, const Tensor& targets, const std::optional<Tensor>& bias,
    double temperature, int64_t ignore_index) {
  // The op's autograd formula is registered from Python; the ATen calls inside must not record their own.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_fused_logprobs_inputs(hidden, weight, targets, bias, temperature);
  const int64_t batch_rows = hidden.size(0), vocab_size = weight.size(0);
  const auto float_options = hidden.options().dtype(at::kFloat);
  const ActiveRows active = select_active_rows(hidden, targets, ignore_index, vocab_size);
  const int64_t n = active.count();
  if (n == 0) {
    const Tensor zeros = at::zeros({batch_rows}, float_options);
    return {zeros, zeros.clone(), zeros.clone(), zeros.clone()};
  }

  const double inv_temperature = 1.0 / temperature;
  const int64_t num_blocks = ceil_div(n, kTokenBlock), num_tiles = ceil_div(vocab_size, kVocabTile);
  std::vector<LogSumExpStats> stats(n, LogSumExpStats{0.0f, 0.0f, 0.0f});
  Tensor target_logits = at::zeros({n}, float_options);
  float* target_logits_data = target_logits.data_ptr<float>();
  const int64_t* targets_data = active.targets.data_ptr<int64_t>();
  std::mutex merge_mutex;

  // Work items are (vocab tile, token block) pairs, tile-major so a thread mostly reuses its converted weight
  // tile; each thread folds its items into private per-row statistics and merges them at the end. Each row's
  // z_y lies in exactly one tile, so target_logits is written by exactly one item and needs no lock.
  const int64_t num_items = num_tiles * num_blocks;
  run_workers(num_items, [&](const auto& claim_item) {
    int64_t item = claim_item();
    if (item >= num_items) return;
    std::vector<LogSumExpStats> local_stats(n, LogSumExpStats{0.0f, 0.0f, 0.0f});
    const Tensor logits_buffer = at::empty({kTokenBlock * kVocabTile}, float_options);
    VocabTile tile;
    int64_t loaded_tile = -1;
    for (; item < num_items; item = claim_item()) {
      const int64_t tile_index = item / num_blocks, block_start = (item % num_blocks) * kTokenBlock;
      if (tile_index != loaded_tile) {
        tile = load_vocab_tile(weight, bias, tile_index);
        loaded_tile = tile_index;
      }
      const int64_t rows = std::min(kTokenBlock, n - block_start);
      const Tensor logits =
          compute_logits_tile(logits_buffer, active.hidden.narrow(0, block_start, rows), tile, inv_temperature);
      fold_logits_tile(logits, local_stats.data() + block_start, targets_data + block_start,
                       target_logits_data + block_start, tile.start);
    }
    std::lock_guard<std::mutex> guard(merge_mutex);
    for (int64_t r = 0; r < n; ++r) merge_stats(stats[r], local_stats[r]);
  });

  Tensor active_lse = at::empty({n}, float_options), active_mean = at::empty({n}, float_options);
  Tensor active_entropy = at::empty({n}, float_options);
  float* lse_data = active_lse.data_ptr<float>();
  float* mean_data = active_mean.data_ptr<float>();
  float* entropy_data = active_entropy.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    const float log_sum = std::log(stats[r].sum_exp);
    const float mean_shift = stats[r].shifted_dot / stats[r].sum_exp;  // E_p[z] - max, <= 0
    lse_data[r] = stats[r].max + log_sum;
    mean_data[r] = stats[r].max + mean_shift;
    entropy_data[r] = log_sum - mean_shift;
  }
  const Tensor active_logprobs = target_logits - active_lse;
  return {active.scatter(active_logprobs, batch_rows), active.scatter(active_entropy, batch_rows),
          active.scatter(active_lse, batch_rows), active.scatter(active_mean, batch_rows)};
}

// Per-row quantities the backward needs, for the active rows only (all [n] fp32).
struct BackwardRows {
  Tensor lse;
  Tensor slope;        // -g_H / T
  Tensor offset;       // (g_H E_p[z] - g_logp) / T
  Tensor target_grad;  // g_logp / T, added at the target column
};

// dL/d(raw logits) of one tile, computed in place from its temperature-scaled logits z [rows, width]:
//   (1/T) [g_logp (onehot - p) - g_H p (z - E_p[z])] = p (slope z + offset) + onehot * target_grad.
void logits_tile_grad(const Tensor& logits, const BackwardRows& rows_info, int64_t block_start,
                      const int64_t* row_targets, int64_t vocab_start) {
  const int64_t rows = logits.size(0), width = logits.size(1);
  float* logits_data = logits.data_ptr<float>();
  const float* lse = rows_info.lse.data_ptr<float>() + block_start;
  const float* slope = rows_info.slope.data_ptr<float>() + block_start;
  const float* offset = rows_info.offset.data_ptr<float>() + block_start;
  const float* target_grad = rows_info.target_grad.data_ptr<float>() + block_start;
  const RowKernels& kernels = row_kernels();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = logits_data + r * width;
    kernels.grad(row, width, lse[r], slope[r], offset[r]);
    const int64_t column = row_targets[r] - vocab_start;
    if (column >= 0 && column < width) row[column] += target_grad[r];
  }
}

std::tuple<Tensor, Tensor, Tensor> fused_linear_logprobs_backward_cpu(
    const Tensor& grad_logprobs, const Tensor& grad_entropy, const Tensor& hidden, const Tensor& weight,
    const Tensor& targets, const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& mean_logit,
    double temperature, int64_t ignore_index, bool hidden_requires_grad, bool weight_requires_grad,
    bool bias_requires_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_fused_logprobs_inputs(hidden, weight, targets, bias, temperature);
  const int64_t batch_rows = hidden.size(0), hidden_size = hidden.size(1), vocab_size = weight.size(0);
  for (const Tensor* row_tensor : {&grad_logprobs, &grad_entropy, &lse, &mean_logit}) {
    TORCH_CHECK(row_tensor->dim() == 1 && row_tensor->size(0) == batch_rows,
                "fused_linear_logprobs_backward: per-row inputs must be [N] with N = ", batch_rows, ", got shape ",
                row_tensor->sizes());
  }
  TORCH_CHECK(!bias_requires_grad || bias.has_value(),
              "fused_linear_logprobs_backward: bias_requires_grad is set but no bias was given");
  const auto float_options = hidden.options().dtype(at::kFloat);
  Tensor grad_hidden = hidden_requires_grad ? at::zeros(hidden.sizes(), hidden.options()) : hidden.new_empty({0});
  Tensor grad_weight = weight_requires_grad ? at::zeros(weight.sizes(), weight.options()) : weight.new_empty({0});
  Tensor grad_bias_accum = bias_requires_grad ? at::zeros({vocab_size}, float_options) : Tensor();
  const auto finish = [&]() -> std::tuple<Tensor, Tensor, Tensor> {
    Tensor grad_bias = bias_requires_grad ? grad_bias_accum.to(bias->scalar_type()) : hidden.new_empty({0});
    return {grad_hidden, grad_weight, grad_bias};
  };
  const ActiveRows active = select_active_rows(hidden, targets, ignore_index, vocab_size);
  const int64_t n = active.count();
  if (n == 0 || !(hidden_requires_grad || weight_requires_grad || bias_requires_grad)) {
    return finish();
  }

  const double inv_temperature = 1.0 / temperature;
  const auto take_active = [&](const Tensor& per_row) {
    const Tensor as_float = per_row.to(at::kFloat);
    return (active.index.defined() ? as_float.index_select(0, active.index) : as_float).contiguous();
  };
  const Tensor grad_logp = take_active(grad_logprobs) * inv_temperature;
  const Tensor grad_ent = take_active(grad_entropy) * inv_temperature;
  const BackwardRows rows_info{take_active(lse), -grad_ent,
                               (grad_ent * take_active(mean_logit) - grad_logp).contiguous(), grad_logp.contiguous()};

  const int64_t num_blocks = ceil_div(n, kTokenBlock), num_tiles = ceil_div(vocab_size, kVocabTile);
  const int64_t* targets_data = active.targets.data_ptr<int64_t>();
  // fp32 weight gradients accumulate straight into grad_weight; other dtypes go through an fp32 accumulator.
  const bool weight_grad_is_float = weight.scalar_type() == at::kFloat;
  Tensor grad_hidden_accum = hidden_requires_grad ? at::zeros({n, hidden_size}, float_options) : Tensor();
  std::mutex merge_mutex;

  // Accumulates one (tile, block) item into the given grad_hidden block / grad_weight tile / grad_bias tile.
  const auto accumulate_item = [&](const VocabTile& tile, int64_t block_start, const Tensor& logits_buffer,
                                   const Tensor& grad_hidden_rows, const Tensor& grad_weight_tile,
                                   const Tensor& grad_bias_tile) {
    const int64_t rows = std::min(kTokenBlock, n - block_start);
    const Tensor hidden_block = active.hidden.narrow(0, block_start, rows);
    const Tensor grad_logits = compute_logits_tile(logits_buffer, hidden_block, tile, inv_temperature);
    logits_tile_grad(grad_logits, rows_info, block_start, targets_data + block_start, tile.start);
    if (grad_weight_tile.defined()) grad_weight_tile.addmm_(grad_logits.t(), hidden_block);
    if (grad_hidden_rows.defined()) grad_hidden_rows.narrow(0, block_start, rows).addmm_(grad_logits, tile.weight);
    if (grad_bias_tile.defined()) grad_bias_tile.add_(grad_logits.sum(0));
  };

  if (num_tiles >= at::get_num_threads()) {
    // Vocabulary-parallel: a thread owns whole tiles, so it writes its grad_weight / grad_bias rows alone and
    // only grad_hidden needs a private accumulator, merged under the lock.
    run_workers(num_tiles, [&](const auto& claim_item) {
      int64_t tile_index = claim_item();
      if (tile_index >= num_tiles) return;
      const Tensor logits_buffer = at::empty({kTokenBlock * kVocabTile}, float_options);
      const Tensor local_grad_hidden =
          hidden_requires_grad ? at::zeros({n, hidden_size}, float_options) : Tensor();
      for (; tile_index < num_tiles; tile_index = claim_item()) {
        const VocabTile tile = load_vocab_tile(weight, bias, tile_index);
        Tensor grad_weight_tile;
        if (weight_requires_grad) {
          grad_weight_tile = weight_grad_is_float ? grad_weight.narrow(0, tile.start, tile.width)
                                                  : at::zeros({tile.width, hidden_size}, float_options);
        }
        const Tensor grad_bias_tile =
            bias_requires_grad ? grad_bias_accum.narrow(0, tile.start, tile.width) : Tensor();
        for (int64_t block = 0; block < num_blocks; ++block) {
          accumulate_item(tile, block * kTokenBlock, logits_buffer, local_grad_hidden, grad_weight_tile,
                          grad_bias_tile);
        }
        if (weight_requires_grad && !weight_grad_is_float) {
          grad_weight.narrow(0, tile.start, tile.width).copy_(grad_weight_tile);
        }
      }
      if (hidden_requires_grad) {
        std::lock_guard<std::mutex> guard(merge_mutex);
        grad_hidden_accum.add_(local_grad_hidden);
      }
    });
  } else {
    // Fewer tiles than threads (small vocabulary): token-parallel. A thread owns whole token blocks, so it
    // writes its grad_hidden rows alone; grad_weight / grad_bias ([V, H] with V small here) are private.
    Tensor grad_weight_accum =
        weight_requires_grad ? at::zeros({vocab_size, hidden_size}, float_options) : Tensor();
    run_workers(num_blocks, [&](const auto& claim_item) {
      int64_t block = claim_item();
      if (block >= num_blocks) return;
      const Tensor logits_buffer = at::empty({kTokenBlock * kVocabTile}, float_options);
      const Tensor local_grad_weight = weight_requires_grad ? at::zeros_like(grad_weight_accum) : Tensor();
      const Tensor local_grad_bias = bias_requires_grad ? at::zeros_like(grad_bias_accum) : Tensor();
      // With few tiles the converted weight fits in cache; converting it per block is cheaper than holding it.
      for (; block < num_blocks; block = claim_item()) {
        for (int64_t tile_index = 0; tile_index < num_tiles; ++tile_index) {
          const VocabTile tile = load_vocab_tile(weight, bias, tile_index);
          const Tensor grad_weight_tile =
              weight_requires_grad ? local_grad_weight.narrow(0, tile.start, tile.width) : Tensor();
          const Tensor grad_bias_tile =
              bias_requires_grad ? local_grad_bias.narrow(0, tile.start, tile.width) : Tensor();
          accumulate_item(tile, block * kTokenBlock, logits_buffer, grad_hidden_accum,
                          grad_weight_tile, grad_bias_tile);
        }
      }
      std::lock_guard<std::mutex> guard(merge_mutex);
      if (weight_requires_grad) grad_weight_accum.add_(local_grad_weight);
      if (bias_requires_grad) grad_bias_accum.add_(local_grad_bias);
    });
    if (weight_requires_grad) grad_weight.copy_(grad_weight_accum);
  }

  if (hidden_requires_grad) {
    if (active.index.defined()) {
      grad_hidden.index_copy_(0, active.index, grad_hidden_accum.to(hidden.scalar_type()));
    } else {
      grad_hidden.copy_(grad_hidden_accum);
    }
  }
  return finish();
}

}  // namespace

TORCH_LIBRARY(posttrain, m) {
  // Fake (meta) kernels and autograd are registered from Python; tell torch where to find them.
  m.set_python_module("posttrain.ops.fused");
  m.def(
      "fused_linear_logprobs_forward(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "float temperature, int ignore_index) -> (Tensor logprobs, Tensor entropy, Tensor lse, Tensor mean_logit)");
  m.def(
      "fused_linear_logprobs_backward(Tensor grad_logprobs, Tensor grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor targets, Tensor? bias, Tensor lse, Tensor mean_logit, float temperature, int ignore_index, "
      "bool hidden_requires_grad, bool weight_requires_grad, bool bias_requires_grad) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(posttrain, CPU, m) {
  m.impl("fused_linear_logprobs_forward", &fused_linear_logprobs_forward_cpu);
  m.impl("fused_linear_logprobs_backward", &fused_linear_logprobs_backward_cpu);
}

}  // namespace posttrain
