// CUDA implementation of posttrain::fused_linear_cross_entropy (schema and CPU twin in csrc/linear_cross_entropy.cpp).
//
// Compiled only in a CUDAExtension build on a GPU machine (posttrain/ops/build.py). Chunks over tokens on the
// current stream: per chunk, z = h W^T (cuBLAS via at::mm) into one fp32 [chunk, V] buffer, the row kernel of
// linear_cross_entropy_kernel.cu turns it into G = (w / T)(softmax - onehot) and the row losses, then
// grad_hidden rows = G W and grad_weight += G^T h (cuBLAS). 3 GEMMs; 2 with a frozen weight.
// Precision: bf16 / fp16 hidden and weight (same dtype) stay in that dtype for the GEMMs, which accumulate in fp32
// and write fp32 (at::mm's out_dtype overloads); G is rounded to that dtype for the two gradient GEMMs (into a
// second, half-size buffer); grad_weight / grad_bias / grad_hidden accumulate in fp32 and are rounded once.
// Other dtype mixes are upcast to fp32. Extra memory: one fp32 [chunk, V] tile (+ its bf16 / fp16 copy), the
// active rows' hidden and fp32 [n, H] grad_hidden staging, an fp32 [V, H] grad_weight accumulator when weight is
// not fp32: O(N H + V H + chunk V).
//
// Not compiled on the CPU-only dev machines (their torch wheel lacks the c10/cuda headers); CI type-checks it.

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

// Defined in csrc/linear_cross_entropy.cpp (same extension library).
void check_linear_cross_entropy_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                       const at::Tensor& targets, const at::Tensor& token_weights,
                                       const std::optional<at::Tensor>& bias, double temperature,
                                       int64_t chunk_tokens);

namespace cuda {
// Defined in linear_cross_entropy_kernel.cu; see the contract there.
cudaError_t launch_cross_entropy_rows(const float* logits, int64_t rows, int64_t width, const int64_t* targets,
                                      const float* weights, float inv_temperature, void* grad, int grad_kind,
                                      float* row_loss, cudaStream_t stream);
}  // namespace cuda

namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_linear_cross_entropy_cuda(
    const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& token_weights,
    const std::optional<Tensor>& bias, double temperature, int64_t ignore_index, int64_t chunk_tokens,
    bool hidden_requires_grad, bool weight_requires_grad, bool bias_requires_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_cross_entropy_inputs(hidden, weight, targets, token_weights, bias, temperature, chunk_tokens);
  TORCH_CHECK(!bias_requires_grad || bias.has_value(),
              "fused_linear_cross_entropy: bias_requires_grad is set but no bias was given");
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t hidden_size = hidden.size(1), vocab_size = weight.size(0);
  const auto float_options = hidden.options().dtype(at::kFloat);

  // Rows that take part (one host sync for the count, one for the target range check).
  const Tensor index = targets.ne(ignore_index).logical_and_(token_weights.ne(0)).nonzero().squeeze(1);
  const int64_t n = index.size(0);
  const Tensor active_targets = targets.index_select(0, index).contiguous();
  const Tensor active_weights = token_weights.index_select(0, index).to(at::kFloat).contiguous();
  TORCH_CHECK(!active_targets.lt(0).logical_or_(active_targets.ge(vocab_size)).any().item<bool>(),
              "fused_linear_cross_entropy: targets must lie in [0, ", vocab_size, ") or equal ignore_index = ",
              ignore_index);

  const at::ScalarType input_type = hidden.scalar_type();
  const bool reduced = (input_type == at::kBFloat16 || input_type == at::kHalf) && weight.scalar_type() == input_type;
  const at::ScalarType compute_type = reduced ? input_type : at::kFloat;
  const int grad_kind = !reduced ? 0 : input_type == at::kBFloat16 ? 1 : 2;
  const Tensor active_hidden = hidden.index_select(0, index).to(compute_type).contiguous();
  const Tensor weight_compute = weight.to(compute_type).contiguous();
  const Tensor bias_float = bias.has_value() ? bias->to(at::kFloat) : Tensor();

  Tensor grad_hidden = hidden_requires_grad ? at::zeros(hidden.sizes(), hidden.options()) : hidden.new_empty({0});
  Tensor grad_weight = weight_requires_grad ? at::zeros(weight.sizes(), weight.options()) : weight.new_empty({0});
  const Tensor grad_hidden_rows = hidden_requires_grad ? at::empty({n, hidden_size}, float_options) : Tensor();
  const Tensor grad_weight_accum = !weight_requires_grad              ? Tensor()
                                   : weight.scalar_type() == at::kFloat ? grad_weight
                                                                        : at::zeros({vocab_size, hidden_size},
                                                                                    float_options);
  const Tensor grad_bias_accum = bias_requires_grad ? at::zeros({vocab_size}, float_options) : Tensor();
  const bool any_grad = hidden_requires_grad || weight_requires_grad || bias_requires_grad;
  const Tensor row_loss = at::zeros({std::max<int64_t>(n, 1)}, float_options);

  const double inv_temperature = 1.0 / temperature;
  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_tokens, n));
  const Tensor tile_buffer = at::empty({n > 0 ? chunk * vocab_size : 1}, float_options);
  const Tensor grad_buffer =
      reduced && any_grad && n > 0 ? at::empty({chunk * vocab_size}, hidden.options().dtype(compute_type)) : Tensor();
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    const Tensor hidden_chunk = active_hidden.narrow(0, start, rows);
    Tensor logits = tile_buffer.narrow(0, 0, rows * vocab_size).view({rows, vocab_size});
    if (reduced) {  // GEMM 1 in bf16 / fp16, fp32 accumulate and output
      at::mm_out(logits, hidden_chunk, weight_compute.t(), at::kFloat);
      if (bias_float.defined()) logits.add_(bias_float);
      if (inv_temperature != 1.0) logits.mul_(inv_temperature);
    } else if (bias_float.defined()) {
      at::addmm_out(logits, bias_float, hidden_chunk, weight_compute.t(), inv_temperature, inv_temperature);
    } else {
      at::mm_out(logits, hidden_chunk, weight_compute.t());
      if (inv_temperature != 1.0) logits.mul_(inv_temperature);
    }
    const Tensor grad_logits =
        !any_grad ? Tensor() : reduced ? grad_buffer.narrow(0, 0, rows * vocab_size).view({rows, vocab_size}) : logits;
    C10_CUDA_CHECK(cuda::launch_cross_entropy_rows(
        logits.data_ptr<float>(), rows, vocab_size, active_targets.data_ptr<int64_t>() + start,
        active_weights.data_ptr<float>() + start, static_cast<float>(inv_temperature),
        any_grad ? grad_logits.data_ptr() : nullptr, grad_kind, row_loss.data_ptr<float>() + start, stream));
    if (hidden_requires_grad) {  // GEMM 2: grad_hidden rows = G W
      Tensor out = grad_hidden_rows.narrow(0, start, rows);
      if (reduced) {
        at::mm_out(out, grad_logits, weight_compute, at::kFloat);
      } else {
        at::mm_out(out, grad_logits, weight_compute);
      }
    }
    if (weight_requires_grad) {  // GEMM 3: grad_weight += G^T h
      if (reduced) {
        Tensor accum = grad_weight_accum;
        at::addmm_out(accum, grad_weight_accum, grad_logits.t(), hidden_chunk, at::kFloat);
      } else {
        grad_weight_accum.addmm_(grad_logits.t(), hidden_chunk);
      }
    }
    if (bias_requires_grad) grad_bias_accum.add_(grad_logits.sum(0, false, at::kFloat));
  }

  if (hidden_requires_grad && n > 0) grad_hidden.index_copy_(0, index, grad_hidden_rows.to(hidden.scalar_type()));
  if (weight_requires_grad && !grad_weight_accum.is_same(grad_weight)) grad_weight.copy_(grad_weight_accum);
  Tensor grad_bias = bias_requires_grad ? grad_bias_accum.to(bias->scalar_type()) : hidden.new_empty({0});
  const Tensor loss = row_loss.narrow(0, 0, n).sum(at::kDouble).to(at::kFloat);
  return {loss, grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(posttrain, CUDA, m) { m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_cuda); }

}  // namespace posttrain
