"""The SFT (cross-entropy) loss with an explicit, step-wide token reduction."""

from __future__ import annotations

import torch

REDUCTIONS = ("token_mean", "sum")


def sft_loss(
    token_logprobs: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    step_target_tokens: int,
    reduction: str = "token_mean",
    world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of this micro-batch's target tokens, scaled for the optimizer step.

    token_mean: loss = world_size * sum_t(-logp_t * mask_t) / step_target_tokens, where
    step_target_tokens counts target tokens in the whole optimizer step (all micro-batches, all
    ranks). Summing the gradients of the step's micro-batches (and DeepSpeed's mean over ranks, which
    the world_size factor undoes) gives the gradient of the step's token mean, so micro-batch 1 x
    accum 8 and micro-batch 8 x accum 1 update identically.
    sum: loss = world_size * sum_t(-logp_t * mask_t): the summed token loss Tülu 3's SFT lr (5e-6)
    was tuned for (open-instruct `reduce_loss=sum`; REFERENCE.md section 1).

    token_logprobs, target_mask: [B, T]; returns (loss, {"nll_sum": detached summed NLL}).
    """
    nll_sum = -(token_logprobs * target_mask).sum()
    loss = nll_sum * sft_loss_scale(step_target_tokens=step_target_tokens, reduction=reduction, world_size=world_size)
    return loss, {"nll_sum": nll_sum.detach()}


def sft_loss_scale(*, step_target_tokens: int, reduction: str = "token_mean", world_size: int = 1) -> float:
    """The factor `sft_loss` multiplies the micro-batch's summed NLL by: world_size / step_target_tokens for
    token_mean, world_size for sum. Callers that get the summed NLL from elsewhere (the loss-fused kernel,
    `posttrain.ops.linear_cross_entropy` with the target mask as token weights) scale it by this."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown SFT loss reduction {reduction!r}; known: {', '.join(REDUCTIONS)}")
    return world_size / (step_target_tokens if reduction == "token_mean" else 1)
