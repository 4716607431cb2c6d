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
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown SFT loss reduction {reduction!r}; known: {', '.join(REDUCTIONS)}")
    nll_sum = -(token_logprobs * target_mask).sum()
    denominator = step_target_tokens if reduction == "token_mean" else 1
    loss = nll_sum * (world_size / denominator)
    return loss, {"nll_sum": nll_sum.detach()}
