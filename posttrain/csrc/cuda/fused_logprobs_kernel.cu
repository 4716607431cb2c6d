// CUDA kernels of the fused linear log-prob op: the elementwise work on [rows, width] fp32 logits tiles.
//
// Only CUDA headers: no torch/ATen, so this file compiles with plain `nvcc -c` (the CPU torch wheel lacks the
// c10/cuda headers) and CI can check it on a machine without a GPU. The tile GEMMs (logits = h W_tile^T,
// grad_weight += dlogits^T h, grad_hidden += dlogits W_tile) run through at::addmm (cuBLAS) in the binding,
// csrc/cuda/fused_logprobs_cuda.cpp, which calls the launchers below on the current stream.
//
// Same maths as csrc/fused_logprobs.cpp, with z the temperature-scaled logits of one row:
//   per-row running statistics over vocabulary tiles, stored as float[rows][3] = (m, Z, D) with
//   Z = sum e^(z - m), D = sum (z - m) e^(z - m) (Z == 0 marks "no logits yet"); then
//   lse = m + log Z, E_p[z] = m + D / Z, logprob = z_y - lse, entropy = log Z - D / Z;
//   backward: dL/d(raw logit) = (1/T) [g_logp (onehot - p) - g_H p (z - E_p[z])], p = e^(z - lse).
// Rows whose target equals ignore_index produce zeros and zero gradients.

#include <cuda_runtime.h>

#include <cstdint>

namespace posttrain {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;

struct LogSumExpStats {
  float max;
  float sum_exp;
  float shifted_dot;
};

// Folds `other` into `into`; both describe disjoint sets of logits of one row (sum_exp == 0: empty set).
__device__ __forceinline__ void merge_stats(LogSumExpStats& into, const LogSumExpStats& other) {
  if (other.sum_exp == 0.0f) return;
  if (into.sum_exp == 0.0f) {
    into = other;
    return;
  }
  const float new_max = fmaxf(into.max, other.max);
  const float into_scale = expf(into.max - new_max);
  const float other_scale = expf(other.max - new_max);
  // Re-centre each D on new_max: sum (z - M) e^(z - M) = e^(m - M) (D + (m - M) Z).
  into.shifted_dot = into_scale * (into.shifted_dot + (into.max - new_max) * into.sum_exp) +
                     other_scale * (other.shifted_dot + (other.max - new_max) * other.sum_exp);
  into.sum_exp = into_scale * into.sum_exp + other_scale * other.sum_exp;
  into.max = new_max;
}

// Adds one logit to a thread's running statistics (online softmax, one pass over the row).
__device__ __forceinline__ void add_logit(LogSumExpStats& stats, float logit) {
  if (stats.sum_exp == 0.0f) {
    stats = {logit, 1.0f, 0.0f};
  } else if (logit > stats.max) {
    const float scale = __expf(stats.max - logit);
    stats.shifted_dot = scale * (stats.shifted_dot + (stats.max - logit) * stats.sum_exp);
    stats.sum_exp = scale * stats.sum_exp + 1.0f;
    stats.max = logit;
  } else {
    const float shifted = logit - stats.max;
    const float exp_shifted = __expf(shifted);
    stats.sum_exp += exp_shifted;
    stats.shifted_dot += shifted * exp_shifted;
  }
}

__device__ __forceinline__ LogSumExpStats shuffle_down(const LogSumExpStats& stats, int offset) {
  return {__shfl_down_sync(0xffffffffu, stats.max, offset), __shfl_down_sync(0xffffffffu, stats.sum_exp, offset),
          __shfl_down_sync(0xffffffffu, stats.shifted_dot, offset)};
}

// One block per row: reduce the row's tile to statistics and fold them into row_stats; record z_y.
__global__ void fold_logits_tile_kernel(const float* __restrict__ logits, int64_t rows, int64_t width,
                                        int64_t row_stride, const int64_t* __restrict__ targets, int64_t vocab_start,
                                        float* __restrict__ row_stats, float* __restrict__ target_logits) {
  __shared__ LogSumExpStats warp_stats[kThreadsPerBlock / kWarpSize];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* row_logits = logits + row * row_stride;
    LogSumExpStats stats{0.0f, 0.0f, 0.0f};
    for (int64_t column = threadIdx.x; column < width; column += blockDim.x) add_logit(stats, row_logits[column]);
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) merge_stats(stats, shuffle_down(stats, offset));
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    if (lane == 0) warp_stats[warp] = stats;
    __syncthreads();
    if (threadIdx.x == 0) {
      LogSumExpStats row_total{row_stats[3 * row], row_stats[3 * row + 1], row_stats[3 * row + 2]};
      for (int w = 0; w < kThreadsPerBlock / kWarpSize; ++w) merge_stats(row_total, warp_stats[w]);
      row_stats[3 * row] = row_total.max;
      row_stats[3 * row + 1] = row_total.sum_exp;
      row_stats[3 * row + 2] = row_total.shifted_dot;
      const int64_t column = targets[row] - vocab_start;
      if (column >= 0 && column < width) target_logits[row] = row_logits[column];
    }
    __syncthreads();  // warp_stats is reused by the next row
  }
}

__global__ void finalize_rows_kernel(const float* __restrict__ row_stats, const float* __restrict__ target_logits,
                                     const int64_t* __restrict__ targets, int64_t ignore_index, int64_t rows,
                                     float* __restrict__ logprobs, float* __restrict__ entropy,
                                     float* __restrict__ lse, float* __restrict__ mean_logit) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (targets[row] == ignore_index) {
      logprobs[row] = entropy[row] = lse[row] = mean_logit[row] = 0.0f;
      continue;
    }
    const float row_max = row_stats[3 * row], sum_exp = row_stats[3 * row + 1];
    const float log_sum = logf(sum_exp), mean_shift = row_stats[3 * row + 2] / sum_exp;
    lse[row] = row_max + log_sum;
    mean_logit[row] = row_max + mean_shift;
    entropy[row] = log_sum - mean_shift;
    logprobs[row] = target_logits[row] - lse[row];
  }
}

// In place, z -> dL/d(raw logit). Grid: x over column chunks, y over rows (both grid-strided).
__global__ void logits_grad_kernel(float* __restrict__ logits, int64_t rows, int64_t width, int64_t row_stride,
                                   const int64_t* __restrict__ targets, int64_t vocab_start, int64_t ignore_index,
                                   const float* __restrict__ lse, const float* __restrict__ mean_logit,
                                   const float* __restrict__ grad_logprobs, const float* __restrict__ grad_entropy,
                                   float inv_temperature) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    float* row_logits = logits + row * row_stride;
    const bool ignored = targets[row] == ignore_index;
    const float target_grad = grad_logprobs[row] * inv_temperature;
    const float entropy_grad = grad_entropy[row] * inv_temperature;
    const float slope = -entropy_grad, offset = entropy_grad * mean_logit[row] - target_grad;
    const float row_lse = lse[row];
    const int64_t target_column = targets[row] - vocab_start;
    for (int64_t column = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; column < width;
         column += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const float z = row_logits[column];
      float grad = __expf(z - row_lse) * (slope * z + offset);
      if (column == target_column) grad += target_grad;
      row_logits[column] = ignored ? 0.0f : grad;
    }
  }
}

unsigned int capped_grid(int64_t wanted, int64_t cap) {
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
}

}  // namespace

// Launchers: raw pointers into contiguous device memory, all on `stream`. Each returns the launch status.

// logits: [rows, width] with row stride row_stride; targets: [rows]; row_stats: [rows][3], zero-initialised before
// the first tile; target_logits: [rows]. Tiles must be folded in stream order (they read-modify-write row_stats).
cudaError_t launch_fold_logits_tile(const float* logits, int64_t rows, int64_t width, int64_t row_stride,
                                    const int64_t* targets, int64_t vocab_start, float* row_stats,
                                    float* target_logits, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  fold_logits_tile_kernel<<<capped_grid(rows, 1 << 20), kThreadsPerBlock, 0, stream>>>(
      logits, rows, width, row_stride, targets, vocab_start, row_stats, target_logits);
  return cudaGetLastError();
}

// Turns row_stats / target_logits of all `rows` rows into the four [rows] outputs.
cudaError_t launch_finalize_rows(const float* row_stats, const float* target_logits, const int64_t* targets,
                                 int64_t ignore_index, int64_t rows, float* logprobs, float* entropy, float* lse,
                                 float* mean_logit, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  finalize_rows_kernel<<<capped_grid((rows + kThreadsPerBlock - 1) / kThreadsPerBlock, 1 << 16), kThreadsPerBlock,
                         0, stream>>>(row_stats, target_logits, targets, ignore_index, rows, logprobs, entropy, lse,
                                      mean_logit);
  return cudaGetLastError();
}

// Overwrites a [rows, width] tile of temperature-scaled logits with dL/d(raw logits); per-row inputs are [rows].
cudaError_t launch_logits_grad(float* logits, int64_t rows, int64_t width, int64_t row_stride,
                               const int64_t* targets, int64_t vocab_start, int64_t ignore_index, const float* lse,
                               const float* mean_logit, const float* grad_logprobs, const float* grad_entropy,
                               float inv_temperature, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  const dim3 grid(capped_grid((width + kThreadsPerBlock - 1) / kThreadsPerBlock, 1 << 16), capped_grid(rows, 65535));
  logits_grad_kernel<<<grid, kThreadsPerBlock, 0, stream>>>(logits, rows, width, row_stride, targets, vocab_start,
                                                           ignore_index, lse, mean_logit, grad_logprobs,
                                                           grad_entropy, inv_temperature);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace posttrain
