// Loss-fused linear cross-entropy on CPU: the SFT loss and its gradients in one pass, at the 3-GEMM floor.
//
// Op (schema at the bottom, Python side in posttrain/ops/cross_entropy.py):
//   posttrain::fused_linear_cross_entropy(hidden [N,H], weight [V,H], targets [N] int64, token_weights [N] float,
//       bias [V]?, temperature, ignore_index, chunk_tokens, hidden_requires_grad, weight_requires_grad,
//       bias_requires_grad) -> (loss [] fp32, grad_hidden [N,H] | [0], grad_weight [V,H] | [0], grad_bias [V] | [0])
//
// Maths, with z = (hidden @ weight^T + bias) / T per row and p = softmax(z):
//   loss = sum_i w_i (lse(z_i) - z_i[y_i])                          (= sum_i w_i * (-log p_i[y_i]))
//   G_i = dloss / d(raw logits)_i = (w_i / T) (p_i - onehot(y_i))     known in the forward: w is an input
//   grad_hidden = G W, grad_weight = G^T hidden, grad_bias = sum_i G_i.
// The returned gradients are those of `loss` itself; autograd scales them by the upstream scalar gradient
// (posttrain/ops/cross_entropy.py), so no backward pass over the vocabulary exists. Rows whose target is
// ignore_index, or whose weight is 0, contribute nothing and are dropped up front.
//
// Work is chunked over TOKENS: each chunk of c rows gets its full [c, V] fp32 logits tile (one GEMM), the row
// loops turn it in place into G (the softmax is exact: the whole row is there), and two GEMMs consume it:
// grad_hidden rows = G W (written once) and grad_weight += G^T h. 3 GEMMs in all (2 with a frozen weight), the
// floor for a loss needing dhidden and dweight; the general per-token op (fused_logprobs.cpp) needs a 4th because
// its upstream gradient is unknown until backward. Memory beyond inputs and outputs: one [c, V] fp32 tile, an fp32
// copy of the active hidden rows / of the weight when they are not fp32, an fp32 [V, H] grad_weight accumulator
// when weight is not fp32, and an fp32 [n, H] grad_hidden staging buffer when rows are dropped or hidden is not
// fp32: O(N H + V H + c V), never [N, V]. The chunk size is the caller's (Python picks it so the tile is bounded).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "softmax_rows.h"  // exp_for_softmax, row_kernels()

namespace posttrain {

// Defined in fused_logprobs.cpp (same library): shape / dtype / device / temperature checks of the shared inputs.
void check_fused_logprobs_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                 const std::optional<at::Tensor>& bias, double temperature);

// The cross-entropy op's own checks on top of those; shared with csrc/cuda/linear_cross_entropy_cuda.cpp.
void check_linear_cross_entropy_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                       const at::Tensor& targets, const at::Tensor& token_weights,
                                       const std::optional<at::Tensor>& bias, double temperature,
                                       int64_t chunk_tokens) {
  check_fused_logprobs_inputs(hidden, weight, targets, bias, temperature);
  TORCH_CHECK(token_weights.dim() == 1 && token_weights.size(0) == hidden.size(0),
              "fused_linear_cross_entropy: token_weights must be [N] with N = ", hidden.size(0), ", got shape ",
              token_weights.sizes());
  TORCH_CHECK(at::isFloatingType(token_weights.scalar_type()),
              "fused_linear_cross_entropy: token_weights must be floating point, got ", token_weights.scalar_type());
  TORCH_CHECK(token_weights.device() == hidden.device(), "fused_linear_cross_entropy: token_weights is on ",
              token_weights.device(), " but hidden is on ", hidden.device());
  TORCH_CHECK(chunk_tokens >= 1, "fused_linear_cross_entropy: chunk_tokens must be >= 1, got ", chunk_tokens);
}

namespace {

using at::Tensor;

// The rows that take part: target != ignore_index and weight != 0 (the others add 0 to the loss and its grads).
struct WeightedRows {
  Tensor index;    // [n] int64 positions in the batch; undefined when every row takes part
  Tensor hidden;   // [n, H] fp32 contiguous
  Tensor targets;  // [n] int64 contiguous, each in [0, V)
  Tensor weights;  // [n] fp32 contiguous
  int64_t count() const { return targets.size(0); }
};

WeightedRows select_weighted_rows(const Tensor& hidden, const Tensor& targets, const Tensor& token_weights,
                                  int64_t ignore_index, int64_t vocab_size) {
  WeightedRows active;
  const Tensor keep = targets.ne(ignore_index).logical_and_(token_weights.ne(0));
  const int64_t n = keep.sum().item<int64_t>();
  if (n == targets.size(0)) {
    active.hidden = hidden.to(at::kFloat).contiguous();
    active.targets = targets.contiguous();
    active.weights = token_weights.to(at::kFloat).contiguous();
  } else {
    active.index = keep.nonzero().squeeze(1);
    active.hidden = hidden.index_select(0, active.index).to(at::kFloat).contiguous();
    active.targets = targets.index_select(0, active.index).contiguous();
    active.weights = token_weights.index_select(0, active.index).to(at::kFloat).contiguous();
  }
  if (n > 0) {
    const auto [lowest, highest] = at::aminmax(active.targets);
    const int64_t lowest_target = lowest.item<int64_t>(), highest_target = highest.item<int64_t>();
    TORCH_CHECK(lowest_target >= 0 && highest_target < vocab_size,
                "fused_linear_cross_entropy: targets must lie in [0, ", vocab_size, ") or equal ignore_index = ",
                ignore_index, ", got values in [", lowest_target, ", ", highest_target, "]");
  }
  return active;
}

// In place over a [rows, V] tile of temperature-scaled logits: each row becomes (w / T) (softmax - onehot(y)),
// and row_loss[r] = w (lse - z_y). Rows are independent, so threads split them; one row (V floats, at most
// ~0.5 MiB at V = 128k) stays in a core's L2 across the max / exp-sum / exp-scale passes.
void softmax_minus_onehot_rows(const Tensor& logits, const int64_t* targets, const float* weights,
                               float inv_temperature, bool write_grad, double* row_loss) {
  const int64_t rows = logits.size(0), width = logits.size(1);
  float* logits_data = logits.data_ptr<float>();
  const RowKernels& kernels = row_kernels();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = logits_data + r * width;
      const LogSumExpStats stats = kernels.stats(row, width);
      const float lse = stats.max + std::log(stats.sum_exp);
      const int64_t target = targets[r];
      row_loss[r] = static_cast<double>(weights[r]) * (static_cast<double>(lse) - row[target]);
      if (!write_grad) continue;
      const float scale = weights[r] * inv_temperature;
      kernels.grad(row, width, lse, 0.0f, scale);  // row_v = e^(z_v - lse) * scale
      row[target] -= scale;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_linear_cross_entropy_cpu(
    const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& token_weights,
    const std::optional<Tensor>& bias, double temperature, int64_t ignore_index, int64_t chunk_tokens,
    bool hidden_requires_grad, bool weight_requires_grad, bool bias_requires_grad) {
  // The op's autograd formula is registered from Python; the ATen calls inside must not record their own.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_cross_entropy_inputs(hidden, weight, targets, token_weights, bias, temperature, chunk_tokens);
  TORCH_CHECK(!bias_requires_grad || bias.has_value(),
              "fused_linear_cross_entropy: bias_requires_grad is set but no bias was given");
  const int64_t hidden_size = hidden.size(1), vocab_size = weight.size(0);
  const auto float_options = hidden.options().dtype(at::kFloat);
  const WeightedRows active = select_weighted_rows(hidden, targets, token_weights, ignore_index, vocab_size);
  const int64_t n = active.count();

  Tensor grad_hidden = hidden_requires_grad ? at::zeros(hidden.sizes(), hidden.options()) : hidden.new_empty({0});
  Tensor grad_weight = weight_requires_grad ? at::zeros(weight.sizes(), weight.options()) : weight.new_empty({0});
  Tensor grad_bias_accum = bias_requires_grad ? at::zeros({vocab_size}, float_options) : Tensor();
  // fp32 gradients accumulate in place; other dtypes through fp32 buffers, rounded once at the end.
  const bool stage_hidden_grad = hidden_requires_grad && (active.index.defined() || hidden.scalar_type() != at::kFloat);
  Tensor grad_hidden_rows = !hidden_requires_grad ? Tensor()
                            : stage_hidden_grad   ? at::empty({n, hidden_size}, float_options)
                                                  : grad_hidden;
  Tensor grad_weight_accum = !weight_requires_grad              ? Tensor()
                             : weight.scalar_type() == at::kFloat ? grad_weight
                                                                  : at::zeros({vocab_size, hidden_size}, float_options);
  const bool any_grad = hidden_requires_grad || weight_requires_grad || bias_requires_grad;

  double loss = 0.0;
  if (n > 0) {
    const Tensor weight_float = weight.to(at::kFloat).contiguous();
    const Tensor bias_float = bias.has_value() ? bias->to(at::kFloat) : Tensor();
    const double inv_temperature = 1.0 / temperature;
    const int64_t chunk = std::min(chunk_tokens, n);
    const Tensor tile_buffer = at::empty({chunk * vocab_size}, float_options);
    std::vector<double> row_loss(n, 0.0);
    const int64_t* targets_data = active.targets.data_ptr<int64_t>();
    const float* weights_data = active.weights.data_ptr<float>();
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t rows = std::min(chunk, n - start);
      const Tensor hidden_chunk = active.hidden.narrow(0, start, rows);
      Tensor logits = tile_buffer.narrow(0, 0, rows * vocab_size).view({rows, vocab_size});
      if (bias_float.defined()) {  // GEMM 1: z = (h W^T + b) / T
        at::addmm_out(logits, bias_float, hidden_chunk, weight_float.t(), inv_temperature, inv_temperature);
      } else {
        at::mm_out(logits, hidden_chunk, weight_float.t());
        if (inv_temperature != 1.0) logits.mul_(inv_temperature);
      }
      softmax_minus_onehot_rows(logits, targets_data + start, weights_data + start,
                                static_cast<float>(inv_temperature), any_grad, row_loss.data() + start);
      if (hidden_requires_grad) {  // GEMM 2: grad_hidden rows = G W
        Tensor out = grad_hidden_rows.narrow(0, start, rows);
        at::mm_out(out, logits, weight_float);
      }
      if (weight_requires_grad) grad_weight_accum.addmm_(logits.t(), hidden_chunk);  // GEMM 3: += G^T h
      if (bias_requires_grad) grad_bias_accum.add_(logits.sum(0));
    }
    for (const double value : row_loss) loss += value;
  }

  if (stage_hidden_grad && n > 0) {
    if (active.index.defined()) {
      grad_hidden.index_copy_(0, active.index, grad_hidden_rows.to(hidden.scalar_type()));
    } else {
      grad_hidden.copy_(grad_hidden_rows);
    }
  }
  if (weight_requires_grad && !grad_weight_accum.is_same(grad_weight)) grad_weight.copy_(grad_weight_accum);
  Tensor grad_bias = bias_requires_grad ? grad_bias_accum.to(bias->scalar_type()) : hidden.new_empty({0});
  return {at::full({}, loss, float_options), grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(posttrain, m) {
  m.def(
      "fused_linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, Tensor token_weights, Tensor? bias, "
      "float temperature, int ignore_index, int chunk_tokens, bool hidden_requires_grad, bool weight_requires_grad, "
      "bool bias_requires_grad) -> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(posttrain, CPU, m) { m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_cpu); }

}  // namespace posttrain
