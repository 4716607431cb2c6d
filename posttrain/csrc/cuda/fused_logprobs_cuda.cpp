// CUDA implementation of posttrain::fused_linear_logprobs_{forward,backward} (schemas in csrc/fused_logprobs.cpp).
//
// Compiled only in a CUDAExtension build on a GPU machine (posttrain/ops/build.py adds it when
// torch.cuda.is_available() and CUDA_HOME is set; see csrc/README.md). It walks vocabulary tiles and token blocks
// on the current stream: each tile's logits come from at::addmm (cuBLAS) into one reused fp32 buffer, and the
// elementwise work is done by the raw-pointer kernels of fused_logprobs_kernel.cu. bf16 / fp16 inputs are upcast
// tile by tile; all accumulation is fp32. Extra memory: O(N) row statistics, an fp32 copy of hidden when it is
// not fp32, one [kTokenBlock, kVocabTile] fp32 tile, and an fp32 [N, H] grad_hidden accumulator in backward.
//
// Not compiled on the CPU-only dev machines (their torch wheel lacks the c10/cuda headers); only the .cu file is.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace posttrain {

// Defined in csrc/fused_logprobs.cpp (same extension library): shape / dtype / device / temperature checks.
void check_fused_logprobs_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                 const std::optional<at::Tensor>& bias, double temperature);

namespace cuda {
// Defined in fused_logprobs_kernel.cu; see the contracts there.
cudaError_t launch_fold_logits_tile(const float* logits, int64_t rows, int64_t width, int64_t row_stride,
                                    const int64_t* targets, int64_t vocab_start, float* row_stats,
                                    float* target_logits, cudaStream_t stream);
cudaError_t launch_finalize_rows(const float* row_stats, const float* target_logits, const int64_t* targets,
                                 int64_t ignore_index, int64_t rows, float* logprobs, float* entropy, float* lse,
                                 float* mean_logit, cudaStream_t stream);
cudaError_t launch_logits_grad(float* logits, int64_t rows, int64_t width, int64_t row_stride,
                               const int64_t* targets, int64_t vocab_start, int64_t ignore_index, const float* lse,
                               const float* mean_logit, const float* grad_logprobs, const float* grad_entropy,
                               float inv_temperature, cudaStream_t stream);
}  // namespace cuda

namespace {

using at::Tensor;

// A 4096 x 8192 fp32 tile is 128 MiB: large enough to keep cuBLAS and the kernels busy on a big GPU, a small
// fraction of the [N, V] logits at training sizes (e.g. 32k tokens x 128k vocabulary = 16 GiB).
constexpr int64_t kTokenBlock = 4096;
constexpr int64_t kVocabTile = 8192;

// Same contract as the CPU kernel: every target is ignore_index or in [0, V). One host sync per call.
void check_target_range(const Tensor& targets, int64_t ignore_index, int64_t vocab_size) {
  const Tensor out_of_range = targets.ne(ignore_index).logical_and(targets.lt(0).logical_or(targets.ge(vocab_size)));
  TORCH_CHECK(!out_of_range.any().item<bool>(), "fused_linear_logprobs: targets must lie in [0, ", vocab_size,
              ") or equal ignore_index = ", ignore_index);
}

Tensor logits_tile(const Tensor& buffer, const Tensor& hidden_block, const Tensor& weight_tile,
                   const Tensor& bias_tile, double inv_temperature) {
  Tensor logits = buffer.narrow(0, 0, hidden_block.size(0) * weight_tile.size(0))
                      .view({hidden_block.size(0), weight_tile.size(0)});
  if (bias_tile.defined()) {
    at::addmm_out(logits, bias_tile, hidden_block, weight_tile.t(), inv_temperature, inv_temperature);
  } else {
    at::mm_out(logits, hidden_block, weight_tile.t());
    if (inv_temperature != 1.0) logits.mul_(inv_temperature);
  }
  return logits;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_linear_logprobs_forward_cuda(
    const Tensor& hidden, const Tensor& weight, const Tensor& targets, const std::optional<Tensor>& bias,
    double temperature, int64_t ignore_index) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_fused_logprobs_inputs(hidden, weight, targets, bias, temperature);
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch_rows = hidden.size(0), vocab_size = weight.size(0);
  check_target_range(targets, ignore_index, vocab_size);
  const auto float_options = hidden.options().dtype(at::kFloat);
  const Tensor hidden_float = hidden.to(at::kFloat).contiguous();
  const Tensor targets_contiguous = targets.contiguous();
  Tensor logprobs = at::empty({batch_rows}, float_options), entropy = at::empty({batch_rows}, float_options);
  Tensor lse = at::empty({batch_rows}, float_options), mean_logit = at::empty({batch_rows}, float_options);
  if (batch_rows == 0) return {logprobs, entropy, lse, mean_logit};
  Tensor row_stats = at::zeros({batch_rows, 3}, float_options);
  Tensor target_logits = at::zeros({batch_rows}, float_options);
  const Tensor buffer =
      at::empty({std::min(batch_rows, kTokenBlock) * std::min(vocab_size, kVocabTile)}, float_options);
  const double inv_temperature = 1.0 / temperature;
  for (int64_t vocab_start = 0; vocab_start < vocab_size; vocab_start += kVocabTile) {
    const int64_t width = std::min(kVocabTile, vocab_size - vocab_start);
    const Tensor weight_tile = weight.narrow(0, vocab_start, width).to(at::kFloat);
    const Tensor bias_tile = bias.has_value() ? bias->narrow(0, vocab_start, width).to(at::kFloat) : Tensor();
    for (int64_t row_start = 0; row_start < batch_rows; row_start += kTokenBlock) {
      const int64_t rows = std::min(kTokenBlock, batch_rows - row_start);
      const Tensor logits =
          logits_tile(buffer, hidden_float.narrow(0, row_start, rows), weight_tile, bias_tile, inv_temperature);
      C10_CUDA_CHECK(cuda::launch_fold_logits_tile(
          logits.data_ptr<float>(), rows, width, width, targets_contiguous.data_ptr<int64_t>() + row_start,
          vocab_start, row_stats.data_ptr<float>() + 3 * row_start, target_logits.data_ptr<float>() + row_start,
          stream));
    }
  }
  C10_CUDA_CHECK(cuda::launch_finalize_rows(row_stats.data_ptr<float>(), target_logits.data_ptr<float>(),
                                            targets_contiguous.data_ptr<int64_t>(), ignore_index, batch_rows,
                                            logprobs.data_ptr<float>(), entropy.data_ptr<float>(),
                                            lse.data_ptr<float>(), mean_logit.data_ptr<float>(), stream));
  return {logprobs, entropy, lse, mean_logit};
}

std::tuple<Tensor, Tensor, Tensor> fused_linear_logprobs_backward_cuda(
    const Tensor& grad_logprobs, const Tensor& grad_entropy, const Tensor& hidden, const Tensor& weight,
    const Tensor& targets, const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& mean_logit,
    double temperature, int64_t ignore_index, bool hidden_requires_grad, bool weight_requires_grad,
    bool bias_requires_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_fused_logprobs_inputs(hidden, weight, targets, bias, temperature);
  TORCH_CHECK(!bias_requires_grad || bias.has_value(),
              "fused_linear_logprobs_backward: bias_requires_grad is set but no bias was given");
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch_rows = hidden.size(0), hidden_size = hidden.size(1), vocab_size = weight.size(0);
  const auto float_options = hidden.options().dtype(at::kFloat);
  const Tensor hidden_float = hidden.to(at::kFloat).contiguous();
  const Tensor targets_contiguous = targets.contiguous();
  const Tensor grad_logprobs_float = grad_logprobs.to(at::kFloat).contiguous();
  const Tensor grad_entropy_float = grad_entropy.to(at::kFloat).contiguous();
  const Tensor lse_contiguous = lse.contiguous(), mean_logit_contiguous = mean_logit.contiguous();
  Tensor grad_hidden_accum = hidden_requires_grad ? at::zeros({batch_rows, hidden_size}, float_options) : Tensor();
  Tensor grad_weight = weight_requires_grad ? at::zeros(weight.sizes(), weight.options()) : weight.new_empty({0});
  Tensor grad_bias_accum = bias_requires_grad ? at::zeros({vocab_size}, float_options) : Tensor();
  const bool weight_grad_is_float = weight.scalar_type() == at::kFloat;
  const Tensor buffer = at::empty(
      {std::max<int64_t>(1, std::min(batch_rows, kTokenBlock) * std::min(vocab_size, kVocabTile))}, float_options);
  const double inv_temperature = 1.0 / temperature;
  const bool any_grad = hidden_requires_grad || weight_requires_grad || bias_requires_grad;
  for (int64_t vocab_start = 0; any_grad && batch_rows > 0 && vocab_start < vocab_size; vocab_start += kVocabTile) {
    const int64_t width = std::min(kVocabTile, vocab_size - vocab_start);
    const Tensor weight_tile = weight.narrow(0, vocab_start, width).to(at::kFloat);
    const Tensor bias_tile = bias.has_value() ? bias->narrow(0, vocab_start, width).to(at::kFloat) : Tensor();
    Tensor grad_weight_tile;
    if (weight_requires_grad) {
      grad_weight_tile = weight_grad_is_float ? grad_weight.narrow(0, vocab_start, width)
                                              : at::zeros({width, hidden_size}, float_options);
    }
    for (int64_t row_start = 0; row_start < batch_rows; row_start += kTokenBlock) {
      const int64_t rows = std::min(kTokenBlock, batch_rows - row_start);
      const Tensor hidden_block = hidden_float.narrow(0, row_start, rows);
      const Tensor grad_logits = logits_tile(buffer, hidden_block, weight_tile, bias_tile, inv_temperature);
      C10_CUDA_CHECK(cuda::launch_logits_grad(
          grad_logits.data_ptr<float>(), rows, width, width, targets_contiguous.data_ptr<int64_t>() + row_start,
          vocab_start, ignore_index, lse_contiguous.data_ptr<float>() + row_start,
          mean_logit_contiguous.data_ptr<float>() + row_start, grad_logprobs_float.data_ptr<float>() + row_start,
          grad_entropy_float.data_ptr<float>() + row_start, static_cast<float>(inv_temperature), stream));
      if (weight_requires_grad) grad_weight_tile.addmm_(grad_logits.t(), hidden_block);
      if (hidden_requires_grad) grad_hidden_accum.narrow(0, row_start, rows).addmm_(grad_logits, weight_tile);
      if (bias_requires_grad) grad_bias_accum.narrow(0, vocab_start, width).add_(grad_logits.sum(0));
    }
    if (weight_requires_grad && !weight_grad_is_float) {
      grad_weight.narrow(0, vocab_start, width).copy_(grad_weight_tile);
    }
  }
  Tensor grad_hidden = hidden_requires_grad ? grad_hidden_accum.to(hidden.scalar_type()) : hidden.new_empty({0});
  Tensor grad_bias = bias_requires_grad ? grad_bias_accum.to(bias->scalar_type()) : hidden.new_empty({0});
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(posttrain, CUDA, m) {
  m.impl("fused_linear_logprobs_forward", &fused_linear_logprobs_forward_cuda);
  m.impl("fused_linear_logprobs_backward", &fused_linear_logprobs_backward_cuda);
}

}  // namespace posttrain
