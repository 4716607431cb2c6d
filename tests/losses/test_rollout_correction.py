"""Rollout/trainer mismatch: TIS weights, MIS masks and the mismatch figures, against hand-derived numbers."""

import math

import pytest
import torch
from helpers import t

from posttrain.errors import ConfigError
from posttrain.losses import ROLLOUT_CORRECTIONS
from posttrain.losses.rollout_correction import (
    mismatch_metrics,
    mismatch_sums,
    rollout_correction_problems,
    rollout_correction_weights,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_registry_names():
    assert ROLLOUT_CORRECTIONS.names() == ["mis", "off", "tis"]
    with pytest.raises(ConfigError, match="algo.rollout_correction='icepop': unknown rollout correction"):
        rollout_correction_weights("icepop", t([0.0]), t([0.0]), torch.ones(1, 1), 2.0)


def test_tis_weights_truncate_at_the_cap():
    """old - rollout per token: 0.5 -> e^0.5 = 1.6487 (kept); -1 -> e^-1 = 0.3679 (kept: only the top is cut);
    ln 3 -> 3, capped to C = 2; ln 2 -> exactly the cap, 2; padding -> 0."""
    old = t([-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0])
    rollout = t([-1.5, -1.0, -0.5 - LN3], [-1.0 - LN2, -1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    weights = rollout_correction_weights("tis", old, rollout, mask, cap=2.0)
    torch.testing.assert_close(weights, t([math.exp(0.5), math.exp(-1.0), 2.0], [2.0, 1.0, 0.0]))


def test_mis_masks_sequences_outside_both_bounds():
    """Sequence log-ratios sum_t (old - rollout), C = 2 ([1/2, 2] = log in [-0.693, 0.693]):
    A: ln 3 (ratio 3 > 2) masked; B: -ln 3 (1/3 < 1/2) masked; C: 0.5 (1.65) kept;
    D: tokens +1.0 and -0.8 -> 0.2 kept, although its first token's own ratio e^1 = 2.7 exceeds C."""
    old = t([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    rollout = t([-LN3, 0.0], [LN3, 0.0], [-0.25, -0.25], [-1.0, 0.8])
    mask = torch.ones(4, 2)
    weights = rollout_correction_weights("mis", old, rollout, mask, cap=2.0)
    torch.testing.assert_close(weights, t([0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]))
    off = rollout_correction_weights("off", old, rollout, torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]]), cap=2.0)
    torch.testing.assert_close(off, t([1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]))


def test_mismatch_figures_hand_values():
    """d = old - rollout on response tokens: sequence 1 [0.5, -1.0], sequence 2 [ln 3] (+ padding).
    mean |d| = (0.5 + 1 + ln 3) / 3; k3 = e^d - d - 1: e^0.5 - 1.5, e^-1, 3 - ln 3 - 1, mean of the three;
    C = 2: capped tokens: only ln 3 (ratio 3) -> 1/3; sequence ratios e^-0.5 (inside [1/2, 2]) and 3 (outside)
    -> masked 1/2."""
    old = t([0.0, 0.0], [0.0, 0.0])
    rollout = t([-0.5, 1.0], [-LN3, 5.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    sums = mismatch_sums(old, rollout, mask, cap=2.0)
    assert sums["tokens"] == 3 and sums["sequences"] == 2
    metrics = mismatch_metrics(sums)
    assert metrics["mismatch_abs_logprob"] == pytest.approx((1.5 + LN3) / 3)
    k3 = (math.exp(0.5) - 1.5) + math.exp(-1.0) + (2.0 - LN3)
    assert metrics["mismatch_kl_k3"] == pytest.approx(k3 / 3)
    assert metrics["mismatch_capped_token_share"] == pytest.approx(1 / 3)
    assert metrics["mismatch_masked_sequence_share"] == pytest.approx(1 / 2)


def test_no_mismatch_reads_zero():
    logprobs = -torch.rand(3, 4, dtype=torch.float64)
    metrics = mismatch_metrics(mismatch_sums(logprobs, logprobs.clone(), torch.ones(3, 4), cap=2.0))
    assert metrics == {
        "mismatch_abs_logprob": 0.0,
        "mismatch_kl_k3": 0.0,
        "mismatch_capped_token_share": 0.0,
        "mismatch_masked_sequence_share": 0.0,
    }


def test_config_problems():
    assert rollout_correction_problems("tis", 2.0) == []
    assert "algo.rollout_correction_cap=1.0 must be > 1" in rollout_correction_problems("mis", 1.0)[0]
    with pytest.raises(ConfigError, match="known names: mis, off, tis"):
        rollout_correction_problems("is", 2.0)
