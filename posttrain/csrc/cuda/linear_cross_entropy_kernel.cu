// CUDA kernel of the loss-fused linear cross-entropy: softmax-minus-onehot on [rows, V] fp32 logits tiles.
//
// Only CUDA headers: no torch/ATen, so this file compiles with plain `nvcc -c` on a machine without a GPU (as
// fused_logprobs_kernel.cu). The three GEMMs (z = h W^T, grad_hidden = G W, grad_weight += G^T h) run through
// at::mm (cuBLAS) in the binding, csrc/cuda/linear_cross_entropy_cuda.cpp, which calls the launcher below.
//
// Same maths as csrc/linear_cross_entropy.cpp: each row holds the FULL vocabulary of temperature-scaled logits z,
// so one block per row computes lse = max + log sum e^(z - max) exactly (two-pass: an online max/sum, then the
// gradient), row_loss = w (lse - z_y), and G = (w / T)(e^(z - lse) - onehot(y)), written as fp32 (in place over
// the logits) or as bf16 / fp16 into a separate buffer for tensor-core GEMMs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace posttrain {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 512;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreadsPerBlock / kWarpSize;

// Running (max, sum e^(z - max)) of a set of logits; sum == 0 marks the empty set.
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (b.sum == 0.0f) return a;
  if (a.sum == 0.0f) return b;
  const float new_max = fmaxf(a.max, b.max);
  return {new_max, a.sum * __expf(a.max - new_max) + b.sum * __expf(b.max - new_max)};
}

__device__ __forceinline__ void store(float* out, float value) { *out = value; }
__device__ __forceinline__ void store(__nv_bfloat16* out, float value) { *out = __float2bfloat16(value); }
__device__ __forceinline__ void store(__half* out, float value) { *out = __float2half(value); }

// One block per row (grid-strided). `grad` may alias `logits` (GradT = float): each element is read, then
// overwritten, by the same thread. grad == nullptr: loss only.
template <typename GradT>
__global__ void cross_entropy_rows_kernel(const float* logits, int64_t rows, int64_t width,
                                          const int64_t* __restrict__ targets, const float* __restrict__ weights,
                                          float inv_temperature, GradT* grad, float* __restrict__ row_loss) {
  __shared__ MaxSum warp_partials[kWarps];
  __shared__ float row_lse;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* z = logits + row * width;
    MaxSum partial{0.0f, 0.0f};
    for (int64_t column = threadIdx.x; column < width; column += blockDim.x) {
      const float value = z[column];
      if (partial.sum == 0.0f) {
        partial = {value, 1.0f};
      } else if (value > partial.max) {
        partial = {value, partial.sum * __expf(partial.max - value) + 1.0f};
      } else {
        partial.sum += __expf(value - partial.max);
      }
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const MaxSum other{__shfl_down_sync(0xffffffffu, partial.max, offset),
                         __shfl_down_sync(0xffffffffu, partial.sum, offset)};
      partial = merge(partial, other);
    }
    if (threadIdx.x % kWarpSize == 0) warp_partials[threadIdx.x / kWarpSize] = partial;
    __syncthreads();
    if (threadIdx.x == 0) {
      MaxSum total = warp_partials[0];
      for (int warp = 1; warp < kWarps; ++warp) total = merge(total, warp_partials[warp]);
      const float lse = total.max + logf(total.sum);
      row_lse = lse;
      row_loss[row] = weights[row] * (lse - z[targets[row]]);  // z_y read before any thread overwrites it
    }
    __syncthreads();
    if (grad != nullptr) {
      const float lse = row_lse, scale = weights[row] * inv_temperature;
      const int64_t target = targets[row];
      GradT* grad_row = grad + row * width;
      for (int64_t column = threadIdx.x; column < width; column += blockDim.x) {
        const float value = __expf(z[column] - lse) * scale - (column == target ? scale : 0.0f);
        store(grad_row + column, value);
      }
    }
    __syncthreads();  // warp_partials / row_lse are reused by the next row
  }
}

unsigned int capped_grid(int64_t wanted, int64_t cap) {
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
}

template <typename GradT>
cudaError_t launch(const float* logits, int64_t rows, int64_t width, const int64_t* targets, const float* weights,
                   float inv_temperature, GradT* grad, float* row_loss, cudaStream_t stream) {
  cross_entropy_rows_kernel<GradT><<<capped_grid(rows, 1 << 20), kThreadsPerBlock, 0, stream>>>(
      logits, rows, width, targets, weights, inv_temperature, grad, row_loss);
  return cudaGetLastError();
}

}  // namespace

// logits: [rows, width] contiguous fp32, temperature-scaled; targets [rows] in [0, width); weights [rows] fp32;
// row_loss [rows] fp32 out. grad: nullptr (loss only) or a contiguous [rows, width] buffer whose element type is
// grad_kind: 0 = fp32 (may be `logits` itself), 1 = bf16, 2 = fp16. All on `stream`; returns the launch status.
cudaError_t launch_cross_entropy_rows(const float* logits, int64_t rows, int64_t width, const int64_t* targets,
                                      const float* weights, float inv_temperature, void* grad, int grad_kind,
                                      float* row_loss, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  switch (grad_kind) {
    case 1:
      return launch(logits, rows, width, targets, weights, inv_temperature, static_cast<__nv_bfloat16*>(grad),
                    row_loss, stream);
    case 2:
      return launch(logits, rows, width, targets, weights, inv_temperature, static_cast<__half*>(grad), row_loss,
                    stream);
    default:
      return launch(logits, rows, width, targets, weights, inv_temperature, static_cast<float*>(grad), row_loss,
                    stream);
  }
}

}  // namespace cuda
}  // namespace posttrain
