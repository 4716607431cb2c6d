"""Preference models and self-play regression losses.

- `bt`: Bradley-Terry reward-model loss on scalar rewards.
- `gpm_score`, `gpm_score_matrix`, `gpm`: the General Preference Model (Zhang et al. 2024,
  "General Preference Modeling with Preference Representations for Aligning Language Models"),
  a skew-symmetric score between response embeddings that can represent cyclic preferences.
- `mean_preference_scores`, `mean_win_probabilities`, `gpo`, `sppo`: per-response targets from a
  score matrix over K sampled responses, and the self-play losses that regress log-ratios onto them.

Sign convention: an embedding v in R^{2k} is k blocks (v[2l], v[2l+1]); the score of y_i over y_j is
    s(y_i > y_j) = sum_l lambda_l (v_i[2l] v_j[2l+1] - v_i[2l+1] v_j[2l])
                 = <R v_i, v_j> with R = blockdiag(J, ..., J), J = [[0, -1], [1, 0]] (never built densely),
so s is antisymmetric, s(y > y) = 0, and v = [r, 1] gives s = r_i - r_j (Bradley-Terry).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from posttrain.losses import REWARD_MODEL_LOSSES, SELF_PLAY_LOSSES, SELF_PLAY_TARGETS

Metrics = dict[str, torch.Tensor]


def _blocks(embeddings: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split [..., 2k] into the first and second coordinates of each 2-D block, both [..., k]."""
    if embeddings.shape[-1] % 2 != 0:
        raise ValueError(f"{name} has last dimension {embeddings.shape[-1]}; a GPM embedding must have even size 2k")
    pairs = embeddings.unflatten(-1, (embeddings.shape[-1] // 2, 2))
    return pairs[..., 0], pairs[..., 1]


def gpm_score(v_i: torch.Tensor, v_j: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """GPM score s(y_i > y_j), block-wise in O(k); no dense R is built.

    s = sum_l gate_l (v_i[2l] v_j[2l+1] - v_i[2l+1] v_j[2l]); gate = None means gate_l = 1.
    Shapes: v_i, v_j [..., 2k] (broadcastable), gate [..., k] or None. Returns [...].
    """
    first_i, second_i = _blocks(v_i, "v_i")
    first_j, second_j = _blocks(v_j, "v_j")
    cross = first_i * second_j - second_i * first_j
    if gate is not None:
        cross = cross * gate
    return cross.sum(-1)


def gpm_score_matrix(embeddings: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """All pairwise GPM scores among K responses per prompt: S[b, i, j] = s(y_i > y_j | x_b).

    Shapes: embeddings [B, K, 2k], gate [B, k] (one per prompt) or None. Returns [B, K, K],
    exactly antisymmetric with an exactly zero diagonal. Cost O(B K^2 k): one batched matmul, no dense R.
    """
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings has shape {list(embeddings.shape)}; expected [B, K, 2k]")
    first, second = _blocks(embeddings, "embeddings")
    if gate is not None:
        if gate.shape != first.shape[:1] + first.shape[2:]:
            raise ValueError(f"gate has shape {list(gate.shape)}; expected [B, k] = {[first.shape[0], first.shape[2]]}")
        first = first * gate[:, None, :]
    # cross[b, i, j] = sum_l gate_l v_i[2l] v_j[2l+1]; S = cross - cross^T is then exactly antisymmetric
    # with an exactly zero diagonal (two separate matmuls would differ in rounding).
    cross = first @ second.transpose(1, 2)
    return cross - cross.transpose(1, 2)


def bt(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022; margin as in Llama 2).

    loss = mean_pairs[ -log sigma(r_c - r_r - margin) ], rewards [B], margin a float or a [B] tensor.
    Metrics: loss, accuracy (r_c > r_r), rewards/chosen, rewards/rejected, rewards/margin (batch means).
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            f"bt expects chosen and rejected rewards of equal shape [B]; got "
            f"{list(chosen_rewards.shape)} and {list(rejected_rewards.shape)}"
        )
    difference = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(difference - margin).mean()
    difference = difference.detach()
    return loss, {
        "loss": loss.detach(),
        "accuracy": (difference > 0).float().mean(),
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margin": difference.mean(),
    }


def gpm(
    chosen_embeddings: torch.Tensor,
    rejected_embeddings: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    tau: float = 0.1,
    margin: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """General Preference Model loss (Zhang et al. 2024): -log P(y_w > y_l) with a margin.

    s = gpm_score(v_w, v_l, gate); loss = mean_pairs[ -log sigma((s - margin) / tau) ].
    Shapes: embeddings [B, 2k], gate [B, k] or None. Metrics: loss, accuracy (s > 0), score (mean s).
    """
    if chosen_embeddings.shape != rejected_embeddings.shape or chosen_embeddings.dim() != 2:
        raise ValueError(
            f"gpm expects chosen and rejected embeddings of equal shape [B, 2k]; got "
            f"{list(chosen_embeddings.shape)} and {list(rejected_embeddings.shape)}"
        )
    scores = gpm_score(chosen_embeddings, rejected_embeddings, gate)
    loss = -F.logsigmoid((scores - margin) / tau).mean()
    scores = scores.detach()
    return loss, {"loss": loss.detach(), "accuracy": (scores > 0).float().mean(), "score": scores.mean()}


@SELF_PLAY_TARGETS.register("gpo")
def mean_preference_scores(score_matrix: torch.Tensor, tau: float) -> torch.Tensor:
    """GPO target per response: s_hat(y_i) = (1/K) sum_{j=1..K} s(y_i > y_j) / tau.

    The sum includes j = i; s(y > y) = 0, so this equals the sum over the K - 1 other responses
    divided by K (not K - 1), the form written in the GPO/SPPO papers. score_matrix [..., K, K]
    (S[..., i, j] = s(y_i > y_j), e.g. from `gpm_score_matrix`); returns [..., K].
    """
    return score_matrix.mean(-1) / tau


@SELF_PLAY_TARGETS.register("sppo")
def mean_win_probabilities(score_matrix: torch.Tensor, tau: float) -> torch.Tensor:
    """SPPO target per response: P_hat(y_i) = (1/K) sum_{j=1..K} sigma(s(y_i > y_j) / tau).

    Includes j = i, where sigma(0) = 1/2, so P_hat - 1/2 = (1/K) sum_{j != i} (sigma(s_ij / tau) - 1/2):
    the same 1/K normalisation as `mean_preference_scores`. score_matrix [..., K, K]; returns [..., K].
    """
    return torch.sigmoid(score_matrix / tau).mean(-1)


def _self_play_regression(
    loss_name: str,
    policy_logps_w: torch.Tensor,
    policy_logps_l: torch.Tensor,
    reference_logps_w: torch.Tensor,
    reference_logps_l: torch.Tensor,
    scaled_target_w: torch.Tensor,
    scaled_target_l: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """1/2 [(logratio_w - target_w)^2 + (logratio_l - target_l)^2], mean over pairs (targets already / beta)."""
    shapes = {
        t.shape
        for t in (
            policy_logps_w,
            policy_logps_l,
            reference_logps_w,
            reference_logps_l,
            scaled_target_w,
            scaled_target_l,
        )
    }
    if len(shapes) != 1 or policy_logps_w.dim() != 1:
        raise ValueError(
            f"{loss_name} expects every input of shape [B] (per-sequence log-prob sums and targets); "
            f"got shapes {sorted(list(s) for s in shapes)}"
        )
    logratio_w = policy_logps_w - reference_logps_w
    logratio_l = policy_logps_l - reference_logps_l
    loss = (0.5 * ((logratio_w - scaled_target_w) ** 2 + (logratio_l - scaled_target_l) ** 2)).mean()
    return loss, {
        "loss": loss.detach(),
        "logratio/winner": logratio_w.detach().mean(),
        "logratio/loser": logratio_l.detach().mean(),
        "target/winner": scaled_target_w.detach().mean(),
        "target/loser": scaled_target_l.detach().mean(),
    }


@SELF_PLAY_LOSSES.register("gpo")
def gpo(
    policy_logps_w: torch.Tensor,
    policy_logps_l: torch.Tensor,
    reference_logps_w: torch.Tensor,
    reference_logps_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """General Preference Optimization (Zhang et al. 2024, GPM paper; SPPO-style self-play with GPM scores).

    logratio = logp - ref (summed log-probs; ref = the previous iterate pi_t), targets = s_hat from
    `mean_preference_scores` for the winner w and loser l;
    loss = mean_pairs[ 1/2 ((logratio_w - s_hat_w / beta)^2 + (logratio_l - s_hat_l / beta)^2) ].
    All inputs [B]. Metrics: loss, logratio/{winner,loser}, target/{winner,loser} (= s_hat / beta).
    """
    return _self_play_regression(
        "gpo",
        policy_logps_w,
        policy_logps_l,
        reference_logps_w,
        reference_logps_l,
        target_w.detach() / beta,
        target_l.detach() / beta,
    )


@SELF_PLAY_LOSSES.register("sppo")
def sppo(
    policy_logps_w: torch.Tensor,
    policy_logps_l: torch.Tensor,
    reference_logps_w: torch.Tensor,
    reference_logps_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """Self-Play Preference Optimization (Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment").

    targets = P_hat, the mean win probabilities in [0, 1] from `mean_win_probabilities` (NOT P_hat - 1/2:
    the centring happens here);
    loss = mean_pairs[ 1/2 ((logratio_w - (P_hat_w - 1/2) / beta)^2 + (logratio_l - (P_hat_l - 1/2) / beta)^2) ].
    All inputs [B]. Metrics as in `gpo`, with target = (P_hat - 1/2) / beta.
    """
    for name, target in (("target_w", target_w), ("target_l", target_l)):
        if bool(((target < 0) | (target > 1)).any()):
            raise ValueError(
                f"sppo: {name} must be win probabilities P_hat in [0, 1] (from mean_win_probabilities); "
                f"got values in [{target.min().item():.4g}, {target.max().item():.4g}]"
            )
    return _self_play_regression(
        "sppo",
        policy_logps_w,
        policy_logps_l,
        reference_logps_w,
        reference_logps_l,
        (target_w.detach() - 0.5) / beta,
        (target_l.detach() - 0.5) / beta,
    )


def self_play_targets(loss_name: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The target function of the self-play loss `loss_name` (mean_preference_scores for gpo, mean_win_probabilities
    for sppo); any other name fails listing the self-play losses."""
    SELF_PLAY_LOSSES.get(loss_name, "algo.loss")
    return SELF_PLAY_TARGETS.get(loss_name, "algo.loss")


@REWARD_MODEL_LOSSES.register("bt")
def bt_head_loss(
    chosen_values: torch.Tensor, rejected_values: torch.Tensor, gate: torch.Tensor | None, *, margin: float, tau: float
) -> tuple[torch.Tensor, Metrics]:
    """`bt` on a scalar reward head's outputs [B, 1] (the reward-model family's signature). Bradley-Terry has no
    prompt gate and no temperature: P(y_c > y_r) = sigma(r_c - r_r), so `tau` is not used and a gate is refused."""
    if gate is not None:
        raise ValueError("bt: a Bradley-Terry head has no prompt gate; the gate is a GPM option")
    return bt(chosen_values[:, 0], rejected_values[:, 0], margin=margin)


REWARD_MODEL_LOSSES.register("gpm")(gpm)
