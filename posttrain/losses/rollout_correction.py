"""Rollout/trainer mismatch: importance weights that correct for it, and the figures that monitor it.

The rollout engine (vLLM: other kernels, precision, batch shapes) samples from pi_rollout, which is not exactly
the trainer's pi_old it is supposed to be (Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"). Both log-probs are per completion token: `old_logprobs` the trainer's before the
update, `rollout_logprobs` the engine's (Completion.logprobs, in the same temperature-scaled mode), `mask` 1 on
response tokens; all [B, T]. Every correction returns detached weights [B, T] for the policy-gradient term
(`token_weights` of the POLICY_LOSSES), 0 on padding.
"""

from __future__ import annotations

import math

import torch

from posttrain.losses import KL_ESTIMATORS, ROLLOUT_CORRECTIONS


def _token_log_ratio(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_old_trainer(y_t) - log pi_rollout(y_t), 0 on padding."""
    return (old_logprobs.detach() - rollout_logprobs.detach()) * mask


def _sequence_log_ratio(old_logprobs, rollout_logprobs, mask) -> torch.Tensor:
    """log pi_old_trainer(y) / pi_rollout(y) = sum_t of the token log-ratios, [B]."""
    return _token_log_ratio(old_logprobs, rollout_logprobs, mask).sum(-1)


@ROLLOUT_CORRECTIONS.register("off")
def no_correction(old_logprobs, rollout_logprobs, mask, *, cap: float) -> torch.Tensor:
    """w_t = 1 on response tokens (the rollout samples are taken as on-policy)."""
    return mask.to(old_logprobs.dtype)


@ROLLOUT_CORRECTIONS.register("tis")
def truncated_importance_sampling(old_logprobs, rollout_logprobs, mask, *, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS, Yao et al. 2025): w_t = min(pi_old_trainer(y_t) / pi_rollout(y_t), C)
    = min(exp(old_t - rollout_t), cap) per token; ratios below 1 are kept as they are (only the top is truncated)."""
    ratio = torch.exp(_token_log_ratio(old_logprobs, rollout_logprobs, mask))
    return torch.clamp(ratio, max=cap) * mask


@ROLLOUT_CORRECTIONS.register("mis")
def masked_importance_sampling(old_logprobs, rollout_logprobs, mask, *, cap: float) -> torch.Tensor:
    """Sequence-level masking (MIS, Yao et al. 2025's masked variant): a sequence whose importance ratio
    rho = pi_old_trainer(y) / pi_rollout(y) = exp(sum_t (old_t - rollout_t)) leaves [1/C, C] gets w = 0 on all its
    tokens (dropped from the policy gradient), every other sequence w = 1. The bounds themselves are kept."""
    log_rho = _sequence_log_ratio(old_logprobs, rollout_logprobs, mask)
    inside = (log_rho.abs() <= math.log(cap)).to(old_logprobs.dtype)
    return inside[:, None] * mask.to(old_logprobs.dtype)


def rollout_correction_weights(
    name: str, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """The weights [B, T] of the correction `name` (ROLLOUT_CORRECTIONS: off | tis | mis) with cap C."""
    return ROLLOUT_CORRECTIONS.get(name, "algo.rollout_correction")(old_logprobs, rollout_logprobs, mask, cap=cap)


MISMATCH_SUMS = ("tokens", "abs_log_ratio", "k3", "capped_tokens", "sequences", "masked_sequences")


def mismatch_sums(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> dict[str, float]:
    """Sums over a batch (so ranks and chunks can be added up) behind `mismatch_metrics`, with d_t = log
    pi_old_trainer(y_t) - log pi_rollout(y_t) on response tokens:
    tokens, abs_log_ratio = sum |d_t|, k3 = sum (e^d_t - d_t - 1) (Schulman's k3 estimate of KL(rollout ||
    trainer) from samples of the rollout policy), capped_tokens = #{t: e^d_t > C} (TIS truncates them),
    sequences (with a response token), masked_sequences = #{sequences with exp(sum_t d_t) outside [1/C, C]}
    (MIS drops them). The counts are the same whichever correction is on: they monitor the mismatch."""
    mask = mask.to(old_logprobs.dtype)
    log_ratio = _token_log_ratio(old_logprobs, rollout_logprobs, mask)
    k3 = KL_ESTIMATORS.get("k3")(log_ratio) * mask
    has_tokens = mask.sum(-1) > 0
    outside = (log_ratio.sum(-1).abs() > math.log(cap)) & has_tokens
    return {
        "tokens": float(mask.sum()),
        "abs_log_ratio": float(log_ratio.abs().sum()),
        "k3": float(k3.sum()),
        "capped_tokens": float(((log_ratio > math.log(cap)) * mask).sum()),
        "sequences": float(has_tokens.sum()),
        "masked_sequences": float(outside.sum()),
    }


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-step metrics from `mismatch_sums` (added over chunks and ranks): mismatch_abs_logprob (mean |d_t|),
    mismatch_kl_k3 (token-mean k3 of KL(rollout || trainer)), mismatch_capped_token_share (share of tokens with
    ratio > C), mismatch_masked_sequence_share (share of sequences with ratio outside [1/C, C])."""
    tokens, sequences = max(sums["tokens"], 1.0), max(sums["sequences"], 1.0)
    return {
        "mismatch_abs_logprob": sums["abs_log_ratio"] / tokens,
        "mismatch_kl_k3": sums["k3"] / tokens,
        "mismatch_capped_token_share": sums["capped_tokens"] / tokens,
        "mismatch_masked_sequence_share": sums["masked_sequences"] / sequences,
    }


def rollout_correction_problems(name: str, cap: float) -> list[str]:
    """Config problems of algo.rollout_correction / algo.rollout_correction_cap (an unknown name raises)."""
    ROLLOUT_CORRECTIONS.get(name, "algo.rollout_correction")
    if not cap > 1.0:
        return [
            f"algo.rollout_correction_cap={cap} must be > 1: TIS caps ratios at C and MIS keeps [1/C, C] "
            "(about 2 is usual)"
        ]
    return []


def corrected_policy_loss(
    loss_fn, logprobs, old_logprobs, rollout_logprobs, advantages, mask, *, correction: str, cap: float, **loss_kwargs
):
    """A POLICY_LOSSES `loss_fn` with the policy-gradient term weighted by the rollout correction `correction`
    (cap C) of old_logprobs against rollout_logprobs; returns (loss, metrics, mismatch_sums). With `off` the
    weights are the mask, which leaves the loss unchanged."""
    weights = rollout_correction_weights(correction, old_logprobs, rollout_logprobs, mask, cap)
    loss, metrics = loss_fn(logprobs, old_logprobs, advantages, mask, token_weights=weights, **loss_kwargs)
    return loss, metrics, mismatch_sums(old_logprobs, rollout_logprobs, mask, cap)
