"""Plain PyTorch references for the fused linear log-prob and cross-entropy ops (tests and fallback).

It materialises the full [N, V] logits, so it is the memory baseline the fused kernels beat.
"""

from __future__ import annotations

import torch


def reference_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the entropy of each row's distribution.

    logits = (hidden @ weight.T + bias) / temperature, computed in float32;
    logprobs[n] = log_softmax(logits[n])[targets[n]], entropy[n] = -sum_v p log p.
    Rows whose target is `ignore_index` get 0 for both.

    Shapes: hidden [N, H], weight [V, H], bias [V] or None, targets [N] (int64).
    Returns two float32 tensors of shape [N], differentiable w.r.t. hidden, weight and bias.
    """
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    ignored = targets == ignore_index
    safe_targets = torch.where(ignored, torch.zeros_like(targets), targets)
    logprobs = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return torch.where(ignored, zero, logprobs), torch.where(ignored, zero, entropy)


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Weighted cross-entropy of a linear head: loss = sum_n token_weights[n] * (-log_softmax(logits[n])[targets[n]]).

    logits = (hidden @ weight.T + bias) / temperature in float32 (or float64 when hidden is float64, for tests);
    rows whose target is `ignore_index` contribute 0 whatever their weight. Shapes: hidden [N, H], weight [V, H],
    targets [N] int64, token_weights [N] float, bias [V] or None. Returns a scalar, differentiable w.r.t. hidden,
    weight and bias; materialises the [N, V] logits.
    """
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    ignored = targets == ignore_index
    safe_targets = torch.where(ignored, torch.zeros_like(targets), targets)
    target_log_probs = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    weights = torch.where(ignored, torch.zeros_like(token_weights), token_weights).to(compute_dtype)
    return -(weights * torch.where(ignored, torch.zeros_like(target_log_probs), target_log_probs)).sum()
