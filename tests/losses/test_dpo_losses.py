"""DPO family: hand-derived values, equivalences, label-smoothing gradient, shape and reference checks."""

import math

import pytest
import torch
from helpers import t

from posttrain.errors import ConfigError
from posttrain.losses import PAIR_LOSSES
from posttrain.losses.dpo import chosen_nll, dpo, dpo_norm, hinge, ipo, simpo, wpo

DPO_FAMILY = ["dpo", "dpo_norm", "simpo", "ipo", "hinge", "wpo"]
REWARD_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def random_pairs(batch=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, batch, generator=generator, dtype=torch.float64) * 20
    lengths = torch.randint(1, 12, (2, batch), generator=generator)
    return (*logps, *lengths)


def test_registry_has_dpo_family_and_unknown_name_lists_known():
    for name in DPO_FAMILY:
        assert name in PAIR_LOSSES
    assert PAIR_LOSSES.get("dpo") is dpo
    with pytest.raises(ConfigError, match="unknown preference-pair loss .dpo_sigmoid.; known .*: .*dpo_norm.*simpo"):
        PAIR_LOSSES.get("dpo_sigmoid")


@pytest.mark.parametrize("name", DPO_FAMILY)
def test_uniform_signature_scalar_loss_and_detached_metrics(name):
    policy_c, policy_r, reference_c, reference_r, len_c, len_r = random_pairs()
    policy_c.requires_grad_(True)
    loss, metrics = PAIR_LOSSES.get(name)(policy_c, policy_r, reference_c, reference_r, len_c, len_r, beta=0.1)
    assert loss.dim() == 0
    assert REWARD_KEYS <= set(metrics)
    assert all(value.dim() == 0 and not value.requires_grad for value in metrics.values())
    loss.backward()
    assert policy_c.grad is not None and torch.isfinite(policy_c.grad).all()


def test_dpo_hand_value():
    """beta = 0.1; r_c = -10 - (-12) = 2, r_r = -14 - (-15) = 1, d = 1;
    loss = -log sigma(0.1) = log(1 + e^-0.1) = 0.644397; rewards 0.2 / 0.1, margin 0.1, accuracy 1."""
    loss, metrics = dpo(t(-10.0), t(-14.0), t(-12.0), t(-15.0), None, None, beta=0.1)
    assert loss.item() == pytest.approx(0.6443966600735709, rel=1e-12)
    assert loss.item() == pytest.approx(softplus(-0.1), rel=1e-12)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.2)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.1)
    assert metrics["rewards/margin"].item() == pytest.approx(0.1)
    assert metrics["rewards/accuracy"].item() == 1.0


def test_dpo_label_smoothing_hand_value():
    """cDPO: -(1-eps) log sigma(z) - eps log sigma(-z) = -log sigma(z) + eps z (since log sigma(z) - log sigma(-z) = z).
    z = beta d = 0.1, eps = 0.1: 0.644397 + 0.01 = 0.654397."""
    loss, _ = dpo(t(-10.0), t(-14.0), t(-12.0), t(-15.0), None, None, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(softplus(-0.1) + 0.01, rel=1e-12)


def test_dpo_label_smoothing_gradient():
    """dL/dz = -(1-eps) sigma(-z) + eps sigma(z); at z = 0 (policy = reference) that is eps - 1/2.
    beta = 0.1, eps = 0.2: dL/d logp_c = beta (eps - 1/2) = -0.03, dL/d logp_r = +0.03.
    A second point z = beta d = 0.1 * 2: dL/dz = -0.8 sigma(-0.2) + 0.2 sigma(0.2)."""
    policy_c, policy_r = t(-5.0, requires_grad=True), t(-7.0, requires_grad=True)
    loss, _ = dpo(policy_c, policy_r, t(-5.0), t(-7.0), None, None, beta=0.1, label_smoothing=0.2)
    loss.backward()
    assert policy_c.grad.item() == pytest.approx(-0.03, rel=1e-12)
    assert policy_r.grad.item() == pytest.approx(0.03, rel=1e-12)

    policy_c = t(-3.0, requires_grad=True)
    loss, _ = dpo(policy_c, t(-7.0), t(-5.0), t(-7.0), None, None, beta=0.1, label_smoothing=0.2)
    loss.backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert policy_c.grad.item() == pytest.approx(0.1 * (-0.8 * sigmoid(-0.2) + 0.2 * sigmoid(0.2)), rel=1e-12)


def test_label_smoothing_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\]"):
        dpo(*random_pairs(), beta=0.1, label_smoothing=0.7)


def test_dpo_norm_hand_value():
    """beta = 0.5; r_c = (-6 - (-9)) / 3 = 1, r_r = (-8 - (-6)) / 4 = -0.5, d = 1.5, beta d = 0.75;
    loss = log(1 + e^-0.75) = 0.386871; rewards 0.5 / -0.25."""
    loss, metrics = dpo_norm(t(-6.0), t(-8.0), t(-9.0), t(-6.0), torch.tensor([3]), torch.tensor([4]), beta=0.5)
    assert loss.item() == pytest.approx(softplus(-0.75), rel=1e-12)
    assert loss.item() == pytest.approx(0.386871, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.25)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_norm_equals_dpo_on_averaged_inputs(label_smoothing):
    policy_c, policy_r, reference_c, reference_r, len_c, len_r = random_pairs(batch=7, seed=1)
    normalised, normalised_metrics = dpo_norm(
        policy_c, policy_r, reference_c, reference_r, len_c, len_r, beta=5.0, label_smoothing=label_smoothing
    )
    averaged, averaged_metrics = dpo(
        policy_c / len_c,
        policy_r / len_r,
        reference_c / len_c,
        reference_r / len_r,
        None,
        None,
        beta=5.0,
        label_smoothing=label_smoothing,
    )
    torch.testing.assert_close(normalised, averaged)
    for key in REWARD_KEYS:
        torch.testing.assert_close(normalised_metrics[key], averaged_metrics[key])


def test_simpo_hand_value_without_reference():
    """beta = 2, gamma = 0.3 * 2 = 0.6; a_c = -4 / 4 = -1, a_r = -9 / 3 = -3;
    z = 2 (-1 - (-3)) - 0.6 = 3.4; loss = log(1 + e^-3.4) = 0.032826; rewards -2 / -6, margin 4."""
    loss, metrics = simpo(t(-4.0), t(-9.0), None, None, torch.tensor([4]), torch.tensor([3]), beta=2.0)
    assert loss.item() == pytest.approx(softplus(-3.4), rel=1e-12)
    assert metrics["rewards/chosen"].item() == pytest.approx(-2.0)
    assert metrics["rewards/rejected"].item() == pytest.approx(-6.0)
    assert metrics["rewards/margin"].item() == pytest.approx(4.0)


def test_simpo_gamma_beta_ratio():
    """Ratio 0 removes the margin: z = 2 * 2 = 4, loss = log(1 + e^-4)."""
    loss, _ = simpo(t(-4.0), t(-9.0), None, None, torch.tensor([4]), torch.tensor([3]), beta=2.0, gamma_beta_ratio=0.0)
    assert loss.item() == pytest.approx(softplus(-4.0), rel=1e-12)


def test_ipo_known_points():
    """beta = 0.25, so the target margin 1/(2 beta) = 2.
    r_c = (-6 - (-10)) / 2 = 2, r_r = 0, d = 2: loss (2 - 2)^2 = 0 with zero gradient.
    Same sums with length 4: r_c = 1, d = 1, loss (1 - 2)^2 = 1; dL/d logp_c = 2 (d - 2) / 4 = -0.5.
    Policy = reference: d = 0, loss = 4."""
    policy_c = t(-6.0, requires_grad=True)
    loss, _ = ipo(policy_c, t(-5.0), t(-10.0), t(-5.0), torch.tensor([2]), torch.tensor([3]), beta=0.25)
    loss.backward()
    assert loss.item() == 0.0 and policy_c.grad.item() == 0.0

    policy_c = t(-6.0, requires_grad=True)
    loss, metrics = ipo(policy_c, t(-5.0), t(-10.0), t(-5.0), torch.tensor([4]), torch.tensor([3]), beta=0.25)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert policy_c.grad.item() == pytest.approx(-0.5)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.25)

    loss, _ = ipo(t(-6.0), t(-5.0), t(-6.0), t(-5.0), torch.tensor([4]), torch.tensor([3]), beta=0.25)
    assert loss.item() == pytest.approx(4.0)


def test_hinge_known_points():
    """beta = 0.5. Pair 1: d = 1, relu(1 - 0.5) = 0.5, dL/d logp_c = -beta / B = -0.25.
    Pair 2: d = 3, relu(1 - 1.5) = 0, no gradient. Mean over the 2 pairs = 0.25."""
    policy_c = t(-1.0, -1.0, requires_grad=True)
    loss, _ = hinge(policy_c, t(-5.0, -5.0), t(-2.0, -4.0), t(-5.0, -5.0), None, None, beta=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.25)
    torch.testing.assert_close(policy_c.grad, t(-0.25, 0.0))


@pytest.mark.parametrize("name", ["ipo", "hinge"])
def test_losses_without_smoothed_form_reject_label_smoothing(name):
    with pytest.raises(ValueError, match="no label-smoothed form"):
        PAIR_LOSSES.get(name)(*random_pairs(), beta=0.1, label_smoothing=0.1)


def test_wpo_hand_value_and_detached_weight():
    """w = exp(-2/4 + -3/2) = e^-2 = 0.135335 (policy average log-probs, detached).
    r_c = -2 - (-3) = 1, r_r = -3 - (-3) = 0, beta d = 0.1: loss = e^-2 log(1 + e^-0.1) = 0.087211.
    Gradient: w beta (-sigma(-0.1)) only; the weight itself passes no gradient."""
    policy_c = t(-2.0, requires_grad=True)
    loss, metrics = wpo(policy_c, t(-3.0), t(-3.0), t(-3.0), torch.tensor([4]), torch.tensor([2]), beta=0.1)
    loss.backward()
    weight = math.exp(-2.0)
    assert loss.item() == pytest.approx(weight * softplus(-0.1), rel=1e-12)
    assert metrics["wpo/weight"].item() == pytest.approx(weight, rel=1e-12)
    assert policy_c.grad.item() == pytest.approx(-weight * 0.1 / (1 + math.exp(0.1)), rel=1e-12)


def test_wpo_weight_is_per_sequence_and_clamped():
    """Two pairs, weights exp(-1/1 + -2/2) = e^-2 and exp(-4/8 + -1/4) = e^-0.75: one weight per pair.
    A pair with positive average log-probs (not a real model, but possible numerically) is clamped to 1."""
    policy_c, policy_r = t(-1.0, -4.0), t(-2.0, -1.0)
    _, metrics = wpo(policy_c, policy_r, policy_c, policy_r, torch.tensor([1, 8]), torch.tensor([2, 4]), beta=0.1)
    assert metrics["wpo/weight"].item() == pytest.approx((math.exp(-2.0) + math.exp(-0.75)) / 2, rel=1e-12)
    loss, metrics = wpo(t(3.0), t(1.0), t(3.0), t(1.0), torch.tensor([1]), torch.tensor([1]), beta=0.1)
    assert metrics["wpo/weight"].item() == 1.0
    assert loss.item() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("name", DPO_FAMILY)
def test_per_token_logps_are_rejected(name):
    """The WPO trap in REFERENCE.md: per-token [B, T] log-probs where per-sequence sums [B] belong."""
    per_token = -torch.rand(3, 5)
    with pytest.raises(ValueError, match=r"expected per-sequence values of shape \[B\]"):
        PAIR_LOSSES.get(name)(
            per_token, per_token, per_token, per_token, torch.full((3,), 5), torch.full((3,), 5), beta=0.1
        )


@pytest.mark.parametrize("name", ["dpo", "dpo_norm", "ipo", "hinge", "wpo"])
def test_missing_reference_is_a_clear_error(name):
    policy_c, policy_r, _, _, len_c, len_r = random_pairs()
    with pytest.raises(ValueError, match="needs reference_chosen_logps and reference_rejected_logps"):
        PAIR_LOSSES.get(name)(policy_c, policy_r, None, None, len_c, len_r, beta=0.1)


@pytest.mark.parametrize("name", ["dpo_norm", "simpo", "ipo", "wpo"])
def test_length_normalised_losses_need_positive_lengths(name):
    policy_c, policy_r, reference_c, reference_r, len_c, len_r = random_pairs()
    with pytest.raises(ValueError, match="chosen_lengths"):
        PAIR_LOSSES.get(name)(policy_c, policy_r, reference_c, reference_r, None, len_r, beta=0.1)
    len_c[0] = 0
    with pytest.raises(ValueError, match="must be > 0"):
        PAIR_LOSSES.get(name)(policy_c, policy_r, reference_c, reference_r, len_c, len_r, beta=0.1)


def test_chosen_nll_hand_value_and_gradient():
    """logp_c = [-2, -6] over [2, 3] tokens: per-token -1 and -2, NLL = 1.5; d NLL / d logp_c_i = -1 / (B |c_i|)."""
    logps = t(-2.0, -6.0, requires_grad=True)
    nll = chosen_nll(logps, torch.tensor([2, 3]))
    assert nll.item() == pytest.approx(1.5)
    nll.backward()
    assert logps.grad.tolist() == pytest.approx([-1 / 4, -1 / 6])


def test_chosen_nll_needs_positive_lengths_and_per_sequence_values():
    with pytest.raises(ValueError, match="chosen_lengths must be > 0"):
        chosen_nll(t(-2.0), torch.tensor([0]))
    with pytest.raises(ValueError, match="expected per-sequence values"):
        chosen_nll(torch.zeros(2, 3), torch.tensor([1, 1]))
