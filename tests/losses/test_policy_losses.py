"""GRPO pieces: group advantages, KL estimators, aggregations and the clipped policy loss."""

import math

import pytest
import torch
from helpers import t

from posttrain.errors import ConfigError
from posttrain.losses import POLICY_LOSSES
from posttrain.losses.policy import aggregate_token_losses, group_advantages, grpo, kl_penalty


def test_grpo_is_registered():
    assert POLICY_LOSSES.get("grpo") is grpo


def test_group_advantages_centered_and_standard():
    """Group [1, 0, 0, 1]: mean 0.5, A = [0.5, -0.5, -0.5, 0.5];
    unbiased std = sqrt((4 * 0.25) / 3) = sqrt(1/3), so standard A = +-0.5 * sqrt(3) = +-0.866025 (eps = 0).
    Group [2, 2, 2, 2] has no variance: keep False, A = 0."""
    rewards = t([1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0])
    advantages, keep = group_advantages(rewards, mode="centered")
    torch.testing.assert_close(advantages, t([0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]))
    assert keep.tolist() == [True, False]
    advantages, keep = group_advantages(rewards, mode="standard", eps=0.0)
    half_root3 = 0.5 * math.sqrt(3.0)
    torch.testing.assert_close(advantages, t([half_root3, -half_root3, -half_root3, half_root3], [0.0] * 4))
    assert keep.tolist() == [True, False]


def test_group_advantages_are_exactly_zero_for_equal_rewards_and_single_samples():
    """0.1 * 3 / 3 is not exactly 0.1 in floating point; dropped groups must still get exactly 0 (no NaN for G = 1)."""
    for mode in ("centered", "standard"):
        advantages, keep = group_advantages(torch.full((2, 3), 0.1), mode=mode)
        assert torch.equal(advantages, torch.zeros(2, 3)) and not keep.any()
        advantages, keep = group_advantages(torch.tensor([[0.7], [0.2]]), mode=mode)
        assert torch.equal(advantages, torch.zeros(2, 1)) and not keep.any()


def test_group_advantages_unknown_mode():
    with pytest.raises(
        ConfigError,
        match="algo.advantage=.whitened.: unknown advantage estimator .whitened.; known names: centered, standard",
    ):
        group_advantages(torch.zeros(1, 2), mode="whitened")


def test_kl_estimators_hand_values():
    """d = logp_ref - logp.  d = -1 (logp -1, ref -2): k1 = 1, k2 = 0.5, k3 = e^-1 + 1 - 1 = 0.367879.
    d = 0.5 (logp -2, ref -1.5): k1 = -0.5, k2 = 0.125, k3 = e^0.5 - 1.5 = 0.148721.  d = 0: all 0."""
    logp, ref = t(-1.0, -2.0, -3.0), t(-2.0, -1.5, -3.0)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t(1.0, -0.5, 0.0))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t(0.5, 0.125, 0.0))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), t(math.exp(-1.0), math.exp(0.5) - 1.5, 0.0))
    with pytest.raises(ConfigError, match="unknown KL estimator .*; known names: k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


def test_k3_gradient():
    """d k3 / d logp = d/dlogp [e^(ref - logp) - (ref - logp) - 1] = 1 - e^d; at d = -1: 1 - e^-1 = 0.632121."""
    logp = t(-1.0, requires_grad=True)
    kl_penalty(logp, t(-2.0), "k3").sum().backward()
    assert logp.grad.item() == pytest.approx(1 - math.exp(-1.0), rel=1e-12)


def test_aggregations_hand_example():
    """x = [[1, 2, 3], [4, 5, 6]], mask = [[1, 1, 0], [1, 0, 0]] (3 response tokens).
    token_mean = (1 + 2 + 4) / 3 = 7/3; sequence_mean = ((1 + 2)/2 + 4/1) / 2 = 2.75;
    sum_constant with C = 2 * 3 = 6: 7/6."""
    x, mask = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate_token_losses(x, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate_token_losses(x, mask, "sequence_mean").item() == pytest.approx(2.75)
    assert aggregate_token_losses(x, mask, "sum_constant", constant_normalizer=6).item() == pytest.approx(7 / 6)
    with pytest.raises(ValueError, match="needs constant_normalizer"):
        aggregate_token_losses(x, mask, "sum_constant")
    with pytest.raises(ConfigError, match="known aggregations: token_mean, sequence_mean, sum_constant"):
        aggregate_token_losses(x, mask, "mean")


@pytest.mark.parametrize(
    "aggregation, expected_loss, expected_grad",
    [
        # ratio = 1 everywhere, A = [-1, -4]: per-token loss -A ratio = [1, 1 | 4], d/dlogp = -A = [1, 1 | 4].
        ("token_mean", 6 / 3, [[1 / 3, 1 / 3, 0.0], [4 / 3, 0.0, 0.0]]),  # every token / 3 tokens
        ("sequence_mean", (1 + 4) / 2, [[1 / 4, 1 / 4, 0.0], [2.0, 0.0, 0.0]]),  # / (len_b * B)
        ("sum_constant", 6 / 6, [[1 / 6, 1 / 6, 0.0], [4 / 6, 0.0, 0.0]]),  # / (T * B) = 6
    ],
)
def test_grpo_aggregations_change_loss_and_gradient(aggregation, expected_loss, expected_grad):
    logprobs = t([-1.0, -2.0, -3.0], [-1.5, -9.0, -9.0], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = grpo(
        logprobs,
        logprobs.detach(),
        t(-1.0, -4.0),
        mask,
        clip_low=0.2,
        clip_high=0.28,
        aggregation=aggregation,
        constant_normalizer=6,
    )
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss)
    assert metrics["policy_loss"].item() == pytest.approx(expected_loss)
    torch.testing.assert_close(logprobs.grad, t(*expected_grad))


def test_clipping_cuts_the_gradient_only_outside_the_trust_region():
    """clip_low = 0.2, clip_high = 0.28 (trust region [0.8, 1.28]); one token per sequence, old logp = 0,
    logp = log ratio, sum_constant with C = 1, so the gradient is d pg / d logp = -A ratio or 0.
    A = +1: ratio 1.27 -> -1.27; 1.29 -> 0 (clipped: no push above 1 + eps_high); 1.25 -> -1.25 (clip-higher:
            would be clipped with a symmetric 0.2); 0.79 -> -0.79 (below the region the pessimistic term
            keeps the gradient that raises the probability).
    A = -1: ratio 0.81 -> +0.81; 0.79 -> 0 (clipped: no push below 1 - eps_low); 1.29 -> +1.29 (unclipped)."""
    ratios = t(1.27, 1.29, 1.25, 0.79, 0.81, 0.79, 1.29)
    advantages = t(1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0)
    logprobs = ratios.log()[:, None].clone().requires_grad_(True)
    loss, metrics = grpo(
        logprobs,
        torch.zeros_like(logprobs),
        advantages,
        torch.ones_like(logprobs),
        clip_low=0.2,
        clip_high=0.28,
        aggregation="sum_constant",
        constant_normalizer=1.0,
    )
    loss.backward()
    expected = t(-1.27, 0.0, -1.25, -0.79, 0.81, 0.0, 1.29)
    torch.testing.assert_close(logprobs.grad[:, 0], expected)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 7)
    assert metrics["ratio_mean"].item() == pytest.approx(ratios.mean().item())


@pytest.mark.parametrize("mode", ["centered", "standard"])
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "sum_constant"])
def test_group_with_equal_rewards_contributes_exactly_zero_gradient(mode, aggregation):
    """P = 2 prompts x G = 3 samples; prompt 1's rewards are all 0.3. Its advantages are exactly 0, so
    -A ratio and -A clip(ratio) are 0 for every token and its sequences get exactly zero gradient."""
    rewards = t([1.0, 0.0, 0.5], [0.3, 0.3, 0.3])
    advantages, keep = group_advantages(rewards, mode=mode)
    assert keep.tolist() == [True, False]
    generator = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(6, 4, generator=generator, dtype=torch.float64)).requires_grad_(True)
    old_logprobs = logprobs.detach() + 0.3 * torch.randn(6, 4, generator=generator, dtype=torch.float64)
    mask = torch.ones(6, 4)
    mask[4, 2:] = 0
    loss, _ = grpo(
        logprobs,
        old_logprobs,
        advantages.reshape(-1),
        mask,
        clip_low=0.2,
        clip_high=0.28,
        aggregation=aggregation,
        constant_normalizer=24.0,
    )
    loss.backward()
    assert torch.equal(logprobs.grad[3:], torch.zeros(3, 4, dtype=torch.float64))
    assert logprobs.grad[:3].abs().sum() > 0


def test_kl_penalty_and_entropy_bonus_in_grpo():
    """A = 0 isolates the extra terms. logp = old = [-1, -1], ref = [-2, -2]: d = -1, k3 = e^-1 per token;
    kl_beta = 0.1, entropy [2, 1], entropy_coef = 0.01, token_mean over 2 tokens:
    loss = 0.1 e^-1 - 0.01 * 1.5 = 0.0367879 - 0.015 = 0.0217879; metrics kl = e^-1, entropy = 1.5;
    d loss / d entropy = -0.01 / 2 per token."""
    logprobs = t([-1.0, -1.0])
    entropy = t([2.0, 1.0], requires_grad=True)
    loss, metrics = grpo(
        logprobs,
        logprobs,
        t(0.0),
        torch.ones(1, 2),
        clip_low=0.2,
        clip_high=0.2,
        reference_logprobs=t([-2.0, -2.0]),
        kl_beta=0.1,
        entropy=entropy,
        entropy_coef=0.01,
    )
    loss.backward()
    assert loss.item() == pytest.approx(0.1 * math.exp(-1.0) - 0.015, rel=1e-12)
    assert metrics["kl"].item() == pytest.approx(math.exp(-1.0)) and metrics["entropy"].item() == pytest.approx(1.5)
    assert metrics["policy_loss"].item() == 0.0
    torch.testing.assert_close(entropy.grad, t([-0.005, -0.005]))


def test_grpo_metrics_are_detached_scalars_and_optional_terms_are_omitted():
    logprobs = (-torch.rand(2, 3, dtype=torch.float64)).requires_grad_(True)
    loss, metrics = grpo(logprobs, logprobs.detach(), t(1.0, -1.0), torch.ones(2, 3), clip_low=0.2, clip_high=0.28)
    assert set(metrics) == {"loss", "policy_loss", "clip_fraction", "ratio_mean"}
    assert all(value.dim() == 0 and not value.requires_grad for value in metrics.values())
    assert loss.requires_grad


def test_per_token_advantages_match_broadcast_sequence_advantages():
    generator = torch.Generator().manual_seed(1)
    logprobs = -torch.rand(3, 4, generator=generator, dtype=torch.float64)
    old_logprobs = logprobs + 0.2 * torch.randn(3, 4, generator=generator, dtype=torch.float64)
    advantages = t(0.5, -1.0, 2.0)
    kwargs = dict(clip_low=0.2, clip_high=0.28)
    per_sequence, _ = grpo(logprobs, old_logprobs, advantages, torch.ones(3, 4), **kwargs)
    per_token, _ = grpo(logprobs, old_logprobs, advantages[:, None].expand(3, 4), torch.ones(3, 4), **kwargs)
    torch.testing.assert_close(per_sequence, per_token)


def test_grpo_input_errors():
    logprobs = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs reference_logprobs"):
        grpo(logprobs, logprobs, torch.zeros(2), torch.ones(2, 3), clip_low=0.2, clip_high=0.2, kl_beta=0.1)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        grpo(logprobs, logprobs, torch.zeros(2), torch.ones(2, 3), clip_low=0.2, clip_high=0.2, entropy_coef=0.1)
    with pytest.raises(ValueError, match=r"equal shape \[B, T\]"):
        grpo(logprobs, logprobs, torch.zeros(2), torch.ones(2, 4), clip_low=0.2, clip_high=0.2)
    with pytest.raises(ValueError, match=r"expected \[B\] or \[B, T\]"):
        grpo(logprobs, logprobs, torch.zeros(3), torch.ones(2, 3), clip_low=0.2, clip_high=0.2)
