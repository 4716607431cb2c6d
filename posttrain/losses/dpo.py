"""The DPO family: offline preference losses on per-sequence log-probs.

Every loss here has the same signature, so a trainer calls any of them the same way:

    fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
       chosen_lengths, rejected_lengths, *, beta, label_smoothing=0.0, **loss_specific) -> (loss, metrics)

Inputs, all of shape [B] (one entry per preference pair):
- `*_logps`: per-sequence SUMS of the response-token log-probs (sum over the response mask first;
  a per-token [B, T] tensor is rejected with a ValueError, see the WPO trap in REFERENCE.md).
- `*_lengths`: response token counts (int or float, > 0), used by the length-normalised losses
  (`dpo_norm`, `simpo`, `ipo`, `wpo`); the others accept None.
- `reference_*_logps`: the frozen reference model's sums; None is allowed only for `simpo`.

`loss` is the mean over pairs. `metrics` holds detached scalars: `loss`, `rewards/chosen`,
`rewards/rejected` (batch means of the implicit reward beta * log-ratio, in the form the loss uses:
summed or averaged), `rewards/margin` (mean chosen - rejected) and `rewards/accuracy` (fraction of
pairs with chosen reward > rejected reward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.losses import PAIR_LOSSES

Metrics = dict[str, torch.Tensor]


def _check_pair_inputs(loss_name: str, **tensors: torch.Tensor | None) -> None:
    """Every given tensor must be 1-D with the shape of the first one (per-sequence values, [B])."""
    expected = None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.dim() != 1:
            raise ValueError(
                f"{loss_name}: {name} has shape {list(tensor.shape)}; expected per-sequence values of "
                f"shape [B] (sum per-token log-probs over the response mask first)"
            )
        if expected is None:
            expected = (name, tensor.shape)
        elif tensor.shape != expected[1]:
            raise ValueError(
                f"{loss_name}: {name} has shape {list(tensor.shape)} but {expected[0]} has "
                f"{list(expected[1])}; all inputs must have one entry per preference pair"
            )


def _require_reference(loss_name: str, reference_chosen_logps, reference_rejected_logps) -> None:
    if reference_chosen_logps is None or reference_rejected_logps is None:
        raise ValueError(
            f"{loss_name} needs reference_chosen_logps and reference_rejected_logps (got None); "
            f"compute them with the reference model, or use the reference-free 'simpo' loss"
        )


def _average(loss_name: str, logps: torch.Tensor, lengths: torch.Tensor | None, name: str) -> torch.Tensor:
    """Per-token average log-prob: the sum divided by the response length."""
    if lengths is None:
        raise ValueError(f"{loss_name} averages log-probs over response tokens and needs {name} (got None)")
    lengths = lengths.to(device=logps.device, dtype=logps.dtype)
    if bool((lengths <= 0).any()):
        raise ValueError(f"{loss_name}: {name} must be > 0 for every pair (an empty response has no average)")
    return logps / lengths


def _check_label_smoothing(loss_name: str, label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"{loss_name}: label_smoothing must be in [0, 0.5], got {label_smoothing}")


def _reject_label_smoothing(loss_name: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(f"{loss_name} has no label-smoothed form; set label_smoothing=0.0 (got {label_smoothing})")


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per pair: -(1 - eps) log sigma(z) - eps log sigma(-z)  (cDPO; eps = 0 is plain DPO)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _reward_metrics(loss: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor | None) -> torch.Tensor:
    """The RPO term (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): the chosen responses'
    negative log-likelihood per token, -mean_pairs(logp_c / |c|). A trainer adds alpha times it to any loss
    of the family, so that the chosen likelihood cannot fall together with the rejected one."""
    _check_pair_inputs("chosen_nll", policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths)
    return -_average("chosen_nll", policy_chosen_logps, chosen_lengths, "chosen_lengths").mean()


@PAIR_LOSSES.register("dpo")
def dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Sigmoid DPO (Rafailov et al. 2023, "Direct Preference Optimization"), with cDPO label smoothing.

    r_c = logp_c - ref_c, r_r = logp_r - ref_r (summed log-probs), d = r_c - r_r;
    loss = mean_pairs[ -(1 - eps) log sigma(beta d) - eps log sigma(-beta d) ]
    (eps = label_smoothing; the conservative DPO of Mitchell 2023). Lengths are unused (may be None).
    Implicit rewards: beta * r_c, beta * r_r.
    """
    _check_pair_inputs(
        "dpo",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    _require_reference("dpo", reference_chosen_logps, reference_rejected_logps)
    _check_label_smoothing("dpo", label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    loss = _smoothed_sigmoid_loss(chosen_rewards - rejected_rewards, label_smoothing).mean()
    return loss, _reward_metrics(loss, chosen_rewards, rejected_rewards)


@PAIR_LOSSES.register("dpo_norm")
def dpo_norm(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024; "dpo_norm", published with beta = 5).

    Same as `dpo` with every log-prob (policy and reference) averaged over its response tokens:
    r_c = (logp_c - ref_c) / len_c, r_r = (logp_r - ref_r) / len_r, d = r_c - r_r;
    loss = mean_pairs[ -(1 - eps) log sigma(beta d) - eps log sigma(-beta d) ].
    Implicit rewards: beta * r_c, beta * r_r (per-token averages).
    """
    _check_pair_inputs(
        "dpo_norm",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _require_reference("dpo_norm", reference_chosen_logps, reference_rejected_logps)
    _check_label_smoothing("dpo_norm", label_smoothing)
    chosen_ratio = _average("dpo_norm", policy_chosen_logps - reference_chosen_logps, chosen_lengths, "chosen_lengths")
    rejected_ratio = _average(
        "dpo_norm", policy_rejected_logps - reference_rejected_logps, rejected_lengths, "rejected_lengths"
    )
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    loss = _smoothed_sigmoid_loss(chosen_rewards - rejected_rewards, label_smoothing).mean()
    return loss, _reward_metrics(loss, chosen_rewards, rejected_rewards)


@PAIR_LOSSES.register("simpo")
def simpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma_beta_ratio: float = 0.3,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward").

    Reference-free; the reference tensors are ignored and may be None.
    a_c = logp_c / len_c, a_r = logp_r / len_r (average log-probs), gamma = gamma_beta_ratio * beta;
    z = beta (a_c - a_r) - gamma;  loss = mean_pairs[ -(1 - eps) log sigma(z) - eps log sigma(-z) ].
    Implicit rewards: beta * a_c, beta * a_r (the margin gamma is not part of the reward).
    """
    _check_pair_inputs(
        "simpo",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _check_label_smoothing("simpo", label_smoothing)
    chosen_rewards = beta * _average("simpo", policy_chosen_logps, chosen_lengths, "chosen_lengths")
    rejected_rewards = beta * _average("simpo", policy_rejected_logps, rejected_lengths, "rejected_lengths")
    gamma = gamma_beta_ratio * beta
    loss = _smoothed_sigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing).mean()
    return loss, _reward_metrics(loss, chosen_rewards, rejected_rewards)


@PAIR_LOSSES.register("ipo")
def ipo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences").

    r_c = (logp_c - ref_c) / len_c, r_r = (logp_r - ref_r) / len_r (average log-ratios), d = r_c - r_r;
    loss = mean_pairs[ (d - 1 / (2 beta))^2 ]. Label smoothing does not apply (must be 0).
    Implicit rewards: beta * r_c, beta * r_r.
    """
    _check_pair_inputs(
        "ipo",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _require_reference("ipo", reference_chosen_logps, reference_rejected_logps)
    _reject_label_smoothing("ipo", label_smoothing)
    chosen_ratio = _average("ipo", policy_chosen_logps - reference_chosen_logps, chosen_lengths, "chosen_lengths")
    rejected_ratio = _average(
        "ipo", policy_rejected_logps - reference_rejected_logps, rejected_lengths, "rejected_lengths"
    )
    loss = ((chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _reward_metrics(loss, beta * chosen_ratio, beta * rejected_ratio)


@PAIR_LOSSES.register("hinge")
def hinge(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Hinge preference loss (SLiC, Zhao et al. 2023, "Calibrating Sequence Likelihood ..."; as in RSO/TRL).

    r_c = logp_c - ref_c, r_r = logp_r - ref_r (summed log-probs), d = r_c - r_r;
    loss = mean_pairs[ relu(1 - beta d) ]. Label smoothing does not apply (must be 0). Lengths unused.
    Implicit rewards: beta * r_c, beta * r_r.
    """
    _check_pair_inputs(
        "hinge",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    _require_reference("hinge", reference_chosen_logps, reference_rejected_logps)
    _reject_label_smoothing("hinge", label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    loss = torch.relu(1.0 - (chosen_rewards - rejected_rewards)).mean()
    return loss, _reward_metrics(loss, chosen_rewards, rejected_rewards)


@PAIR_LOSSES.register("wpo")
def wpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Weighted preference optimisation (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization").

    w = min(1, exp(logp_c / len_c + logp_r / len_r)) from the POLICY's average log-probs, detached
    (a weight, not a gradient path), one per pair: shape [B], never per token.
    loss = mean_pairs[ w * dpo_pair_loss ], dpo_pair_loss as in `dpo` (summed log-ratios, cDPO smoothing).
    The mean is over pairs, not normalised by sum(w). Extra metric `wpo/weight` (mean w).
    Implicit rewards: beta * r_c, beta * r_r as in `dpo`.
    """
    _check_pair_inputs(
        "wpo",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _require_reference("wpo", reference_chosen_logps, reference_rejected_logps)
    _check_label_smoothing("wpo", label_smoothing)
    with torch.no_grad():
        average_sum = _average("wpo", policy_chosen_logps, chosen_lengths, "chosen_lengths") + _average(
            "wpo", policy_rejected_logps, rejected_lengths, "rejected_lengths"
        )
        weight = torch.exp(average_sum).clamp(max=1.0)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    pair_losses = _smoothed_sigmoid_loss(chosen_rewards - rejected_rewards, label_smoothing)
    loss = (weight * pair_losses).mean()
    metrics = _reward_metrics(loss, chosen_rewards, rejected_rewards)
    metrics["wpo/weight"] = weight.mean()
    return loss, metrics
