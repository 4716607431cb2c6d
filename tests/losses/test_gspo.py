"""GSPO: the length-normalised sequence ratio, its per-sequence clipping, and the GSPO-token form."""

import math

import pytest
import torch
from helpers import t

from posttrain.losses import POLICY_LOSSES
from posttrain.losses.policy import IMPORTANCE_LEVELS, grpo, gspo, gspo_token, sequence_ratio

# Two sequences of different lengths: logp - logp_old = [0.1, 0.3 | pad] and [-0.3, 0.0, 0.0].
LOGPROBS = [[-1.0, -2.0, -5.0], [-1.5, -0.5, -0.7]]
OLD = [[-1.1, -2.3, -4.0], [-1.2, -0.5, -0.7]]
MASK = [[1, 1, 0], [1, 1, 1]]


def test_registered_and_importance_levels():
    assert POLICY_LOSSES.get("gspo") is gspo and POLICY_LOSSES.get("gspo_token") is gspo_token
    assert IMPORTANCE_LEVELS == {"token": "grpo", "sequence": "gspo"}


def test_sequence_ratio_is_length_normalised():
    """s_1 = exp((0.1 + 0.3) / 2) = e^0.2 (the padded token's -1.0 difference is ignored);
    s_2 = exp((-0.3 + 0 + 0) / 3) = e^-0.1."""
    ratio = sequence_ratio(t(*LOGPROBS), t(*OLD), torch.tensor(MASK))
    torch.testing.assert_close(ratio, t(math.exp(0.2), math.exp(-0.1)))


@pytest.mark.parametrize("loss_fn", [gspo, gspo_token])
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_gspo_hand_values_unclipped(loss_fn, aggregation):
    """A = [+1, -1]; trust region [0.8, 1.28]: s_1 = e^0.2 = 1.2214 and s_2 = e^-0.1 = 0.9048 are inside,
    so pg_1 = -s_1, pg_2 = +s_2 on every token of the sequence.
    sequence_mean: loss = (-s_1 + s_2) / 2; d/dlogp_1t = -(1/2) s_1 (1/2) = -s_1/4, d/dlogp_2t = (1/2) s_2 (1/3).
    token_mean (5 tokens): loss = (2 (-s_1) + 3 s_2) / 5; d/dlogp_1t = -(2/5) s_1 (1/2) = -s_1/5, d/dlogp_2t = s_2/5."""
    s1, s2 = math.exp(0.2), math.exp(-0.1)
    logprobs = t(*LOGPROBS, requires_grad=True)
    loss, metrics = loss_fn(
        logprobs, t(*OLD), t(1.0, -1.0), torch.tensor(MASK), clip_low=0.2, clip_high=0.28, aggregation=aggregation
    )
    loss.backward()
    if aggregation == "sequence_mean":
        expected_loss, g1, g2 = (-s1 + s2) / 2, -s1 / 4, s2 / 6
    else:
        expected_loss, g1, g2 = (-2 * s1 + 3 * s2) / 5, -s1 / 5, s2 / 5
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(logprobs.grad, t([g1, g1, 0.0], [g2, g2, g2]))
    assert metrics["clip_fraction"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx((2 * s1 + 3 * s2) / 5)


def test_gspo_clips_whole_sequences():
    """logp - logp_old = [0.2, 0.4] -> s_1 = e^0.3 = 1.3499 > 1.28 with A = +1: clipped, the whole sequence gets no
    gradient although its first token's own ratio e^0.2 = 1.2214 is inside the region (grpo keeps that token:
    d/dlogp = -(1/2)(1/2) e^0.2).
    Sequence 2 as before (s_2 = e^-0.1, A = -1): gradient s_2/6 per token (sequence_mean). clip_fraction 2/5."""
    logprobs = t([-1.0, -2.0, -5.0], [-1.5, -0.5, -0.7], requires_grad=True)
    old = t([-1.2, -2.4, -4.0], [-1.2, -0.5, -0.7])
    mask = torch.tensor(MASK)
    loss, metrics = gspo(logprobs, old, t(1.0, -1.0), mask, clip_low=0.2, clip_high=0.28, aggregation="sequence_mean")
    loss.backward()
    s2 = math.exp(-0.1)
    assert loss.item() == pytest.approx((-1.28 + s2) / 2, rel=1e-12)
    torch.testing.assert_close(logprobs.grad, t([0.0, 0.0, 0.0], [s2 / 6] * 3))
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    token_level = t(*logprobs.detach().tolist(), requires_grad=True)
    grpo(token_level, old, t(1.0, -1.0), mask, clip_low=0.2, clip_high=0.28, aggregation="sequence_mean")[0].backward()
    assert token_level.grad[0, 0].item() == pytest.approx(-math.exp(0.2) / 4)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "sum_constant"])
def test_gspo_token_equals_gspo_for_sequence_advantages(aggregation):
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 5, generator=generator, dtype=torch.float64)
    old = logprobs + 0.2 * torch.randn(4, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    kwargs = dict(clip_low=0.2, clip_high=0.28, aggregation=aggregation, constant_normalizer=20.0)
    results = []
    for loss_fn in (gspo, gspo_token):
        leaf = logprobs.clone().requires_grad_(True)
        loss, _ = loss_fn(leaf, old, t(1.0, -0.5, 2.0, -1.5), mask, **kwargs)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_gspo_token_takes_per_token_advantages():
    """One sequence, logp - logp_old = [0.1, 0.3]: s = e^0.2; A = [1, 2] per token; token_mean over 2 tokens.
    gspo_token: loss = -(1 + 2) s / 2, d/dlogp_t = -A_t s / 2 = [-s/2, -s]. gspo spreads the same loss through s:
    d/dlogp_t = -(3/2) s (1/2) = -0.75 s on both tokens."""
    s = math.exp(0.2)
    grads = []
    for loss_fn in (gspo_token, gspo):
        logprobs = t([-1.0, -2.0], requires_grad=True)
        loss, _ = loss_fn(logprobs, t([-1.1, -2.3]), t([1.0, 2.0]), torch.ones(1, 2), clip_low=0.2, clip_high=0.28)
        assert loss.item() == pytest.approx(-1.5 * s, rel=1e-12)
        loss.backward()
        grads.append(logprobs.grad)
    torch.testing.assert_close(grads[0], t([-s / 2, -s]))
    torch.testing.assert_close(grads[1], t([-0.75 * s, -0.75 * s]))


def test_token_weights_scale_only_the_policy_term():
    """grpo, one token per sequence, ratio 1 (logp = old), A = [1, 1], kl_beta 0.1 with d = -1 (k3 = e^-1):
    weights [2, 0] give pg = [-2, 0] and the KL term stays on both: token_mean loss = (-2 + 0) / 2 + 0.1 e^-1."""
    logprobs = t([-1.0], [-1.0])
    loss, metrics = grpo(
        logprobs, logprobs, t(1.0, 1.0), torch.ones(2, 1), clip_low=0.2, clip_high=0.28,
        reference_logprobs=t([-2.0], [-2.0]), kl_beta=0.1, token_weights=t([2.0], [0.0]),
    )  # fmt: skip
    assert loss.item() == pytest.approx(-1.0 + 0.1 * math.exp(-1.0), rel=1e-12)
    assert metrics["policy_loss"].item() == pytest.approx(-1.0)
