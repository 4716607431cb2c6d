"""Policy-gradient pieces for RLVR: group advantages, KL estimators, token aggregation and the GRPO loss.

Shapes: B sequences (rollouts) of up to T response tokens; `mask` [B, T] is 1 on response tokens and
0 on padding. Log-probs are per token, [B, T].
"""

from __future__ import annotations

import torch

from posttrain.errors import ConfigError
from posttrain.losses import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.losses.dynamic_sampling import informative_groups

Metrics = dict[str, torch.Tensor]

AGGREGATIONS = ("token_mean", "sequence_mean", "sum_constant")


@ADVANTAGE_ESTIMATORS.register("centered")
def centered_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A = r - mean_group(r) (Dr. GRPO, Liu et al. 2025). rewards [P, G] -> [P, G]."""
    return rewards - rewards.mean(-1, keepdim=True)


@ADVANTAGE_ESTIMATORS.register("standard")
def standardized_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A = (r - mean_group(r)) / (std_group(r) + eps) (GRPO, Shao et al. 2024), with the unbiased (G - 1) std
    as torch.std and the common GRPO implementations; a group of one is only centred. [P, G] -> [P, G]."""
    centered = rewards - rewards.mean(-1, keepdim=True)
    if rewards.shape[-1] < 2:
        return centered
    return centered / (rewards.std(-1, keepdim=True) + eps)


def group_advantages(
    rewards: torch.Tensor, mode: str = "centered", eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages from the estimator `mode` (ADVANTAGE_ESTIMATORS: centered | standard).

    rewards [P, G]: G sampled responses for each of P prompts. Returns (advantages [P, G], keep_mask [P] bool).
    keep_mask is False for groups whose rewards are all equal (no learning signal; also every group when
    G = 1); their advantages are exactly 0.
    """
    estimator = ADVANTAGE_ESTIMATORS.get(mode, "algo.advantage")
    if rewards.dim() != 2:
        raise ValueError(f"rewards has shape {list(rewards.shape)}; expected [num_prompts, group_size]")
    # Exact equality, not std < tol: a group is dropped only when it truly has no signal.
    keep_mask = informative_groups(rewards)
    advantages = estimator(rewards, eps=eps) if mode == "standard" else estimator(rewards)
    # Zero exactly: the float mean of equal values can differ from them in the last bit.
    advantages = torch.where(keep_mask[:, None], advantages, torch.zeros_like(advantages))
    return advantages, keep_mask


@KL_ESTIMATORS.register("k1")
def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = -d, d = logp_ref - logp: unbiased, high variance, can be negative."""
    return -log_ratio


@KL_ESTIMATORS.register("k2")
def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = d^2 / 2: biased, low variance, >= 0."""
    return 0.5 * log_ratio**2


@KL_ESTIMATORS.register("k3")
def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) - d - 1: unbiased, low variance, >= 0."""
    return torch.expm1(log_ratio) - log_ratio


def kl_penalty(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL Divergence").

    d = logp_ref - logp;  k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - d - 1  (k2, k3 >= 0; k3 unbiased, low variance).
    Same shape as the inputs; gradients flow through `logprobs` (the reference is treated as constant).
    """
    return KL_ESTIMATORS.get(estimator, "algo.kl_estimator")(reference_logprobs.detach() - logprobs)


def aggregate_token_losses(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token_mean",
    constant_normalizer: float | None = None,
) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar; the choice changes the gradient, so it is explicit.

    token_mean:    sum_{b,t} m x / sum_{b,t} m                  (every token in the batch weighs the same)
    sequence_mean: (1/B) sum_b [ sum_t m x / sum_t m ]          (GRPO paper: every sequence weighs the same)
    sum_constant:  sum_{b,t} m x / constant_normalizer          (Dr. GRPO: no length bias; pass e.g.
                                                                 max_response_length * batch size)
    A sequence (or batch) with no response tokens contributes 0 rather than NaN.
    """
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"unknown loss aggregation {aggregation!r}; known aggregations: {', '.join(AGGREGATIONS)}")
    if token_losses.shape != mask.shape:
        raise ValueError(f"token losses have shape {list(token_losses.shape)} but mask has {list(mask.shape)}")
    mask = mask.to(token_losses.dtype)
    masked = token_losses * mask
    if aggregation == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if aggregation == "sequence_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if constant_normalizer is None:
        raise ValueError(
            "aggregation 'sum_constant' needs constant_normalizer, e.g. max_response_length * batch "
            "size; it must not depend on the batch's actual lengths"
        )
    return masked.sum() / constant_normalizer


def chunk_loss_weight(
    aggregation: str,
    chunk_sequences: int,
    chunk_tokens: float,
    total_sequences: float,
    total_tokens: float,
    world_size: int,
) -> float:
    """Weight of one chunk's aggregated loss so that summing the chunks' gradients (and DeepSpeed's mean over
    ranks, which `world_size` undoes) gives the gradient of the aggregation over the whole minibatch, all ranks:
    token_mean: world * chunk_tokens / total_tokens; sequence_mean: world * chunk_sequences / total_sequences;
    sum_constant: world (its normalizer is a constant covering the whole minibatch already)."""
    if aggregation == "token_mean":
        return world_size * chunk_tokens / total_tokens
    if aggregation == "sequence_mean":
        return world_size * chunk_sequences / total_sequences
    return float(world_size)


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return aggregate_token_losses(values.detach(), mask, "token_mean")


def _check_policy_inputs(name, logprobs, old_logprobs, advantages, mask, kl_beta, reference, entropy_coef, entropy):
    if not logprobs.shape == old_logprobs.shape == mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"{name} expects logprobs, old_logprobs and mask of equal shape [B, T]; got "
            f"{list(logprobs.shape)}, {list(old_logprobs.shape)}, {list(mask.shape)}"
        )
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    if advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"advantages has shape {list(advantages.shape)}; expected [B] or [B, T] with B = {logprobs.shape[0]}"
        )
    if kl_beta != 0.0 and reference is None:
        raise ValueError(f"{name}: kl_beta = {kl_beta} needs reference_logprobs; pass them or set kl_beta = 0")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(
            f"{name}: entropy_coef = {entropy_coef} needs the per-token entropy; pass it or set entropy_coef = 0"
        )
    return advantages.detach()


def clipped_policy_loss(
    ratio: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    reference_logprobs: torch.Tensor | None,
    kl_beta: float,
    kl_estimator: str,
    entropy: torch.Tensor | None,
    entropy_coef: float,
    aggregation: str,
    constant_normalizer: float | None,
    token_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, Metrics]:
    """The clipped surrogate shared by the policy losses, given each token's importance ratio [B, T]:

        pg = w * max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))
        x  = pg + kl_beta * k(logp_ref - logp) - entropy_coef * entropy
        loss = aggregate_token_losses(x, mask, aggregation, constant_normalizer)

    w (token_weights, detached, default 1) is the rollout/trainer mismatch correction (TIS weights or an MIS
    mask, posttrain.losses.rollout_correction); it scales the policy-gradient term only. advantages [B, 1] or
    [B, T], detached. Metrics as documented on `grpo`."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    policy_token_losses = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        policy_token_losses = policy_token_losses * token_weights.detach()

    token_losses = policy_token_losses
    metrics: Metrics = {}
    if reference_logprobs is not None:
        kl = kl_penalty(logprobs, reference_logprobs, kl_estimator)
        token_losses = token_losses + kl_beta * kl
        metrics["kl"] = _token_mean(kl, mask)
    if entropy is not None:
        token_losses = token_losses - entropy_coef * entropy
        metrics["entropy"] = _token_mean(entropy, mask)

    loss = aggregate_token_losses(token_losses, mask, aggregation, constant_normalizer)
    metrics["loss"] = loss.detach()
    metrics["policy_loss"] = aggregate_token_losses(
        policy_token_losses.detach(), mask, aggregation, constant_normalizer
    )
    metrics["clip_fraction"] = _token_mean((clipped > unclipped).to(ratio.dtype), mask)
    metrics["ratio_mean"] = _token_mean(ratio, mask)
    return loss, metrics


@POLICY_LOSSES.register("grpo")
def grpo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    reference_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    aggregation: str = "token_mean",
    constant_normalizer: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped policy-gradient loss of GRPO (Shao et al. 2024), with DAPO clip-higher (Yu et al. 2025).

    ratio = exp(logp - logp_old); per token
        pg = w * max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))
        x  = pg + kl_beta * k(logp_ref - logp) - entropy_coef * entropy
    and loss = aggregate_token_losses(x, mask, aggregation, constant_normalizer); w = token_weights (default 1).

    Shapes: logprobs, old_logprobs, mask, reference_logprobs, entropy, token_weights [B, T]; advantages [B] (one
    per sequence, broadcast over tokens) or [B, T]. old_logprobs, advantages, reference_logprobs and
    token_weights are treated as constants (detached); entropy is not, so the bonus has a gradient.
    Metrics (detached): loss; policy_loss (pg, aggregated like the loss); clip_fraction (token share where
    the clipped term is active, i.e. the gradient is cut); ratio_mean; kl (token mean, only when
    reference_logprobs is given); entropy (token mean, only when entropy is given).
    """
    advantages = _check_policy_inputs(
        "grpo", logprobs, old_logprobs, advantages, mask, kl_beta, reference_logprobs, entropy_coef, entropy
    )
    ratio = torch.exp(logprobs - old_logprobs.detach())
    return clipped_policy_loss(
        ratio, logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
        reference_logprobs=reference_logprobs, kl_beta=kl_beta, kl_estimator=kl_estimator, entropy=entropy,
        entropy_coef=entropy_coef, aggregation=aggregation, constant_normalizer=constant_normalizer,
        token_weights=token_weights,
    )  # fmt: skip


def sequence_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalised sequence importance ratio (Zheng et al. 2025):

        s_i = exp( (1/|y_i|) sum_t m_it [log pi(y_it) - log pi_old(y_it)] )  = (pi(y_i) / pi_old(y_i))^(1/|y_i|)

    [B, T] -> [B]; differentiable in `logprobs`; a sequence without response tokens gets s = 1."""
    mask = mask.to(logprobs.dtype)
    log_ratio = ((logprobs - old_logprobs.detach()) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return torch.exp(log_ratio)


def _gspo(
    name: str,
    per_token_gradient: bool,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    reference_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    aggregation: str = "token_mean",
    constant_normalizer: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    advantages = _check_policy_inputs(
        name, logprobs, old_logprobs, advantages, mask, kl_beta, reference_logprobs, entropy_coef, entropy
    )
    ratio = sequence_ratio(logprobs, old_logprobs, mask)[:, None]
    if per_token_gradient:  # s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]: the value of s_i, each token's own gradient
        ratio = ratio.detach() * torch.exp(logprobs - logprobs.detach())
    else:
        ratio = ratio.expand_as(logprobs)
    return clipped_policy_loss(
        ratio, logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
        reference_logprobs=reference_logprobs, kl_beta=kl_beta, kl_estimator=kl_estimator, entropy=entropy,
        entropy_coef=entropy_coef, aggregation=aggregation, constant_normalizer=constant_normalizer,
        token_weights=token_weights,
    )  # fmt: skip


@POLICY_LOSSES.register("gspo")
def gspo(logprobs, old_logprobs, advantages, mask, **kwargs) -> tuple[torch.Tensor, Metrics]:
    """Group Sequence Policy Optimization (Zheng et al. 2025): GRPO's clipped surrogate with one importance
    ratio per sequence, the length-normalised s_i of `sequence_ratio`, clipped per sequence:

        pg_i = max(-A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high))

    broadcast over the sequence's tokens and aggregated like grpo (aggregation=sequence_mean is the paper's
    (1/G) sum_i; the paper's eps are small, e.g. clip_low 3e-4 / clip_high 4e-4). Same signature, keyword
    arguments (KL, entropy, aggregation, token_weights) and metrics as `grpo`; clip_fraction counts the tokens
    of clipped sequences. The gradient reaches every token through s_i: d s_i = s_i (1/|y_i|) sum_t d logp_it."""
    return _gspo("gspo", False, logprobs, old_logprobs, advantages, mask, **kwargs)


@POLICY_LOSSES.register("gspo_token")
def gspo_token(logprobs, old_logprobs, advantages, mask, **kwargs) -> tuple[torch.Tensor, Metrics]:
    """GSPO-token (Zheng et al. 2025): s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)], whose value is s_i (so the
    clipping is per sequence) but whose gradient is each token's own, s_i d logp_it; this allows per-token
    advantages A_it. With one advantage per sequence it equals `gspo` in loss and gradient (under every
    aggregation). Signature and metrics as `grpo`."""
    return _gspo("gspo_token", True, logprobs, old_logprobs, advantages, mask, **kwargs)


# algo.importance_level -> the policy loss: token ratios (GRPO) or sequence ratios (GSPO).
IMPORTANCE_LEVELS = {"token": "grpo", "sequence": "gspo"}
