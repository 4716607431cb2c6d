"""The compiled fused linear log-prob op as PyTorch sees it.

csrc/fused_logprobs.cpp defines two ops (schemas and CPU kernels; csrc/cuda adds CUDA kernels):

- `posttrain::fused_linear_logprobs_forward(hidden, weight, targets, bias, temperature, ignore_index)
  -> (logprobs, entropy, lse, mean_logit)`, all [N] float32;
- `posttrain::fused_linear_logprobs_backward(...)`, which recomputes the logits tile by tile.

This module registers their fake (meta) kernels, so they trace under torch.compile / FakeTensor, and
the forward op's autograd formula, whose backward calls the backward op; `load_fused_ops()` also registers
the library's loss-fused op, `posttrain::fused_linear_cross_entropy` (posttrain/ops/cross_entropy.py).
Registration needs the compiled library, so it happens in `load_fused_ops()`, never at import.
"""

from __future__ import annotations

import threading

import torch

from posttrain.ops.build import FusedExtension, load_fused_extension
from posttrain.ops.cross_entropy import register_cross_entropy_op

FORWARD_OP = "posttrain::fused_linear_logprobs_forward"
BACKWARD_OP = "posttrain::fused_linear_logprobs_backward"

_registration_lock = threading.Lock()
_registered = False


def load_fused_ops() -> FusedExtension | None:
    """Build/load the extension and register fake kernels and autograd once; None if the build failed."""
    global _registered
    extension = load_fused_extension()
    if extension is None:
        return None
    with _registration_lock:
        if not _registered:
            torch.library.register_fake(FORWARD_OP)(_forward_fake)
            torch.library.register_fake(BACKWARD_OP)(_backward_fake)
            torch.library.register_autograd(FORWARD_OP, _backward, setup_context=_setup_context)
            register_cross_entropy_op()
            _registered = True
    return extension


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of the target and entropy, without materialising the [N, V] logits.

    With z = (hidden @ weight.T + bias) / temperature per row: logprobs[n] = z[y] - logsumexp(z) and
    entropy[n] = logsumexp(z) - sum_v softmax(z)_v z_v; rows with targets[n] == ignore_index give 0 for
    both and receive no gradient. Same contract as `reference_linear_logprobs`.

    Shapes/dtypes: hidden [N, H] and weight [V, H] float32, bfloat16 or float16 (accumulated in float32),
    bias [V] or None, targets [N] int64. Returns float32 (logprobs [N], entropy [N]), differentiable
    w.r.t. hidden, weight and bias. Extra memory O(N) beyond inputs and gradients.
    Requires `load_fused_ops()` to have succeeded.
    """
    logprobs, entropy, _, _ = torch.ops.posttrain.fused_linear_logprobs_forward(
        hidden, weight, targets, bias, float(temperature), int(ignore_index)
    )
    return logprobs, entropy


def _forward_fake(hidden, weight, targets, bias, temperature, ignore_index):
    per_row = hidden.new_empty((hidden.shape[0],), dtype=torch.float32)
    return per_row, torch.empty_like(per_row), torch.empty_like(per_row), torch.empty_like(per_row)


def _backward_fake(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    targets,
    bias,
    lse,
    mean_logit,
    temperature,
    ignore_index,
    hidden_requires_grad,
    weight_requires_grad,
    bias_requires_grad,
):
    # Gradients that were not asked for come back as empty [0] tensors (a schema cannot return None).
    grad_hidden = hidden.new_empty(hidden.shape if hidden_requires_grad else (0,))
    grad_weight = weight.new_empty(weight.shape if weight_requires_grad else (0,))
    grad_bias = bias.new_empty(bias.shape) if bias_requires_grad else hidden.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index = inputs
    _, _, lse, mean_logit = output
    # O(N) saved state: the inputs are referenced, not copied; lse and mean_logit are [N].
    ctx.save_for_backward(hidden, weight, targets, bias, lse, mean_logit)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse, mean_logit)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse, _grad_mean_logit):
    hidden, weight, targets, bias, lse, mean_logit = ctx.saved_tensors
    hidden_requires_grad, weight_requires_grad, _, bias_requires_grad = ctx.needs_input_grad[:4]
    bias_requires_grad = bias is not None and bias_requires_grad
    grad_hidden, grad_weight, grad_bias = torch.ops.posttrain.fused_linear_logprobs_backward(
        grad_logprobs,
        grad_entropy,
        hidden,
        weight,
        targets,
        bias,
        lse,
        mean_logit,
        ctx.temperature,
        ctx.ignore_index,
        hidden_requires_grad,
        weight_requires_grad,
        bias_requires_grad,
    )
    return (
        grad_hidden if hidden_requires_grad else None,
        grad_weight if weight_requires_grad else None,
        None,
        grad_bias if bias_requires_grad else None,
        None,
        None,
    )
