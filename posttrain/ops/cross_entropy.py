"""The compiled loss-fused linear cross-entropy op as PyTorch sees it.

csrc/linear_cross_entropy.cpp (CPU) and csrc/cuda/linear_cross_entropy_cuda.cpp (CUDA) define
`posttrain::fused_linear_cross_entropy(hidden, weight, targets, token_weights, bias, temperature, ignore_index,
chunk_tokens, hidden_requires_grad, weight_requires_grad, bias_requires_grad) -> (loss, grad_hidden,
grad_weight, grad_bias)`: the scalar loss sum_n w_n * (-logp_n) AND its gradients, computed in the forward
(the per-token weights w are inputs, so dloss/dlogits = (w / T)(softmax - onehot) is known there). Its
autograd formula here only scales the stored gradients by the upstream scalar: no backward over the
vocabulary, 3 GEMMs in all (forward logits, G W, G^T h) against 4 for `fused_linear_logprobs`.

Registration (fake kernel, autograd) runs from `posttrain.ops.fused.load_fused_ops()`, never at import.
"""

from __future__ import annotations

import torch

OP = "posttrain::fused_linear_cross_entropy"

# Largest [chunk_tokens, V] fp32 logits tile per device type: the op holds one (plus, on CUDA with bf16 / fp16
# inputs, a half-size copy of it for the tensor-core GEMMs). Each chunk's grad_weight += G^T h reads and writes the
# whole [V, H] accumulator, so that traffic is V H 8 bytes per chunk against 2 c V H FLOPs: chunks need several
# hundred rows. On CPU 256 MiB gives 523 rows at V = 128256 and 2097 at V = 32000; measured at N 4096, H 512,
# 2 threads, loss_fused over the 3-GEMM floor: 1.16x with 130-row chunks (the former 64 MiB), 1.07x with 261,
# 1.02x with 512, 1.07x with 1024; at V = 32000 1.02-1.03x from 512 to 2048 rows. The tile stays near
# grad_weight's own size at V = 128k and far below the [N, V] logits. CUDA: 261 rows at V = 128256.
CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 128 * 2**20}


def default_chunk_tokens(vocab_size: int, device_type: str) -> int:
    """Tokens per chunk so a [chunk, vocab_size] fp32 tile stays within CHUNK_BYTES[device_type] (at least 1)."""
    return max(1, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]) // (4 * vocab_size))


def register_cross_entropy_op() -> None:
    """Fake kernel and autograd for the op; called once, under posttrain.ops.fused's registration lock."""
    torch.library.register_fake(OP)(_fake)
    torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Scalar float32 loss sum_n token_weights[n] * (-logp_n), logp_n = log_softmax(z_n)[targets[n]] with
    z = (hidden @ weight.T + bias) / temperature; rows with targets == ignore_index contribute 0.

    Same contract as `reference_linear_cross_entropy`; differentiable w.r.t. hidden, weight and bias (token
    weights are constants). Gradients are formed in this call for whichever of hidden / weight / bias require
    grad (none under torch.no_grad: then it is one GEMM), and returned in the input dtypes. chunk_tokens: rows
    per [chunk, V] fp32 tile, default `default_chunk_tokens`. Requires `load_fused_ops()` to have succeeded.
    """
    grad_enabled = torch.is_grad_enabled()
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0], hidden.device.type)
    loss, _, _, _ = torch.ops.posttrain.fused_linear_cross_entropy(
        hidden,
        weight,
        targets,
        token_weights,
        bias,
        float(temperature),
        int(ignore_index),
        int(chunk_tokens),
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
    return loss


def _fake(
    hidden,
    weight,
    targets,
    token_weights,
    bias,
    temperature,
    ignore_index,
    chunk_tokens,
    hidden_requires_grad,
    weight_requires_grad,
    bias_requires_grad,
):
    # Gradients that were not asked for come back as empty [0] tensors (a schema cannot return None).
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape if hidden_requires_grad else (0,))
    grad_weight = weight.new_empty(weight.shape if weight_requires_grad else (0,))
    grad_bias = bias.new_empty(bias.shape) if bias_requires_grad else hidden.new_empty((0,))
    return loss, grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, _, _, bias, *_ = inputs
    hidden_requires_grad, weight_requires_grad, bias_requires_grad = inputs[-3:]
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.computed = (hidden_requires_grad, weight_requires_grad, bias_requires_grad)
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)


def _backward(ctx, grad_loss, _grad_hidden, _grad_weight, _grad_bias):
    stored = ctx.saved_tensors
    needed = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4])
    grads = []
    for gradient, computed, wanted in zip(stored, ctx.computed, needed):
        if wanted and not computed:
            raise RuntimeError(
                "fused_linear_cross_entropy: a gradient was requested for an input that did not require grad when "
                "the loss was computed (the op forms its gradients in the forward); set requires_grad first"
            )
        # grad_loss is a float32 0-dim tensor: the product keeps the gradient's dtype (one extra rounding for bf16).
        grads.append(gradient * grad_loss if wanted else None)
    grad_hidden, grad_weight, grad_bias = grads
    return grad_hidden, grad_weight, None, None, grad_bias, None, None, None, None, None, None
