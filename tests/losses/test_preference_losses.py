"""Bradley-Terry, the GPM skew-symmetric score, and the GPO / SPPO self-play losses."""

import math

import pytest
import torch
from helpers import t

from posttrain.losses import REWARD_MODEL_LOSSES, SELF_PLAY_LOSSES
from posttrain.losses.preference import (
    bt,
    gpm,
    gpm_score,
    gpm_score_matrix,
    gpo,
    mean_preference_scores,
    mean_win_probabilities,
    self_play_targets,
    sppo,
)


def random_embeddings(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_registered_names():
    assert REWARD_MODEL_LOSSES.names() == ["bt", "gpm"] and REWARD_MODEL_LOSSES.get("gpm") is gpm
    assert SELF_PLAY_LOSSES.get("gpo") is gpo and SELF_PLAY_LOSSES.get("sppo") is sppo


def test_bt_head_loss_is_bt_on_the_scalar_head():
    chosen, rejected = t([1.0], [0.0]), t([0.0], [2.0])
    loss, metrics = REWARD_MODEL_LOSSES.get("bt")(chosen, rejected, None, margin=0.5, tau=0.1)
    expected, _ = bt(chosen[:, 0], rejected[:, 0], margin=0.5)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="no prompt gate"):
        REWARD_MODEL_LOSSES.get("bt")(chosen, rejected, t([1.0]), margin=0.0, tau=0.1)


def test_each_self_play_loss_names_its_target_and_unknown_names_fail_listing_them():
    from posttrain.errors import ConfigError

    assert self_play_targets("gpo") is mean_preference_scores and self_play_targets("sppo") is mean_win_probabilities
    with pytest.raises(
        ConfigError,
        match="algo.loss=.dpo.: .dpo. is a preference-pair loss, not a self-play loss; the self-play losses are: gpo",
    ):
        self_play_targets("dpo")


def test_bt_hand_values():
    """r_c - r_r = 2 - 1 = 1: loss = -log sigma(1) = log(1 + e^-1) = 0.313262.
    With margin 1: -log sigma(0) = log 2. Gradient wrt r_c at d = 1: -sigma(-1) = -0.268941."""
    chosen = t(2.0, requires_grad=True)
    loss, metrics = bt(chosen, t(1.0))
    loss.backward()
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)
    assert chosen.grad.item() == pytest.approx(-1 / (1 + math.e), rel=1e-12)
    assert metrics["accuracy"].item() == 1.0 and metrics["rewards/margin"].item() == pytest.approx(1.0)
    loss, _ = bt(t(2.0), t(1.0), margin=1.0)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-12)


def test_gpm_score_hand_value_and_gate_per_block():
    """v_i = [1, 2 | 3, 4], v_j = [5, 6 | 7, 8].
    block 0: 1*6 - 2*5 = -4; block 1: 3*8 - 4*7 = -4; s = -8.
    gate [0.25, 0.75]: 0.25 (-4) + 0.75 (-4) = -4; gate [1, 0] keeps block 0 only: -4; [0, 2]: -8."""
    v_i, v_j = t(1.0, 2.0, 3.0, 4.0), t(5.0, 6.0, 7.0, 8.0)
    assert gpm_score(v_i, v_j).item() == -8.0
    assert gpm_score(v_i, v_j, t(1.0, 1.0)).item() == -8.0
    assert gpm_score(v_i, v_j, t(0.25, 0.75)).item() == -4.0
    assert gpm_score(v_i, v_j, t(1.0, 0.0)).item() == -4.0
    v_k = t(1.0, 2.0, 1.0, 0.0)  # block 0: 1*6 - 2*5 = -4, block 1: 1*8 - 0*7 = 8
    assert gpm_score(v_k, v_j).item() == 4.0
    assert gpm_score(v_k, v_j, t(1.0, 0.0)).item() == -4.0
    assert gpm_score(v_k, v_j, t(0.0, 1.0)).item() == 8.0


def test_gpm_score_is_antisymmetric_with_zero_self_score():
    v_i, v_j = random_embeddings(6, 8, seed=1), random_embeddings(6, 8, seed=2)
    gate = torch.softmax(random_embeddings(6, 4, seed=3), dim=-1)
    for g in (None, gate):
        torch.testing.assert_close(gpm_score(v_i, v_j, g), -gpm_score(v_j, v_i, g))
        assert torch.equal(gpm_score(v_i, v_i, g), torch.zeros(6, dtype=torch.float64))


def test_bradley_terry_is_the_special_case_v_equals_r_one():
    """v = [r, 1]: s(i > j) = r_i * 1 - 1 * r_j = r_i - r_j, exactly."""
    r_i, r_j = t(0.3, -1.5, 2.0), t(1.0, -2.0, 2.0)
    v_i = torch.stack([r_i, torch.ones(3, dtype=torch.float64)], -1)
    v_j = torch.stack([r_j, torch.ones(3, dtype=torch.float64)], -1)
    assert torch.equal(gpm_score(v_i, v_j), r_i - r_j)
    # ... and so the GPM loss at tau = 1 is the BT loss.
    torch.testing.assert_close(gpm(v_i, v_j, tau=1.0)[0], bt(r_i, r_j)[0])


@pytest.mark.parametrize("use_gate", [False, True])
def test_score_matrix_equals_pairwise_loop(use_gate):
    embeddings = random_embeddings(3, 5, 6, seed=4)  # B = 3 prompts, K = 5 responses, 2k = 6
    gate = torch.softmax(random_embeddings(3, 3, seed=5), dim=-1) if use_gate else None
    matrix = gpm_score_matrix(embeddings, gate)
    assert matrix.shape == (3, 5, 5)
    for b in range(3):
        for i in range(5):
            for j in range(5):
                expected = gpm_score(embeddings[b, i], embeddings[b, j], None if gate is None else gate[b])
                torch.testing.assert_close(matrix[b, i, j], expected)
    torch.testing.assert_close(matrix, -matrix.transpose(1, 2))
    assert torch.equal(torch.diagonal(matrix, dim1=1, dim2=2), torch.zeros(3, 5, dtype=torch.float64))


def test_gate_of_all_ones_equals_no_gate_and_a_gate_changes_scores():
    embeddings = random_embeddings(2, 4, 6, seed=6)
    torch.testing.assert_close(
        gpm_score_matrix(embeddings, torch.ones(2, 3, dtype=torch.float64)), gpm_score_matrix(embeddings)
    )
    gate = t(0.7, 0.2, 0.1).expand(2, 3)
    assert not torch.allclose(gpm_score_matrix(embeddings, gate), gpm_score_matrix(embeddings))


def test_two_dimensional_embedding_solves_a_four_cycle():
    """Angles 0, 90, 180, 270 degrees: v = (1,0), (0,1), (-1,0), (0,-1).
    s(A > B) = 1*1 - 0*0 = 1; s(B > C) = 0*0 - 1*(-1) = 1; s(C > D) = (-1)(-1) - 0 = 1;
    s(D > A) = 0*0 - (-1)*1 = 1: every response beats the next (a cycle no scalar reward can express);
    opposite responses tie: s(A > C) = 1*0 - 0*(-1) = 0."""
    angles = torch.tensor([0.0, 90.0, 180.0, 270.0], dtype=torch.float64).deg2rad()
    embeddings = torch.stack([angles.cos(), angles.sin()], -1)[None]  # [1, 4, 2]
    matrix = gpm_score_matrix(embeddings)[0]
    for i in range(4):
        assert matrix[i, (i + 1) % 4].item() == pytest.approx(1.0, abs=1e-12)
        assert matrix[i, (i + 2) % 4].item() == pytest.approx(0.0, abs=1e-12)
    # The GPM probability sigma(s / tau) gets every cyclic pair right.
    assert (torch.sigmoid(matrix[torch.arange(4), (torch.arange(4) + 1) % 4] / 0.1) > 0.99).all()


def test_gpm_loss_hand_values():
    """v = [r, 1] with r_w - r_l = 0.1, tau = 0.1: -log sigma(0.1 / 0.1) = log(1 + e^-1) = 0.313262.
    With margin 0.05: -log sigma(0.05 / 0.1) = log(1 + e^-0.5) = 0.474077."""
    v_w, v_l = t(0.35, 1.0)[None], t(0.25, 1.0)[None]
    loss, metrics = gpm(v_w, v_l)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-9)
    assert metrics["score"].item() == pytest.approx(0.1) and metrics["accuracy"].item() == 1.0
    loss, _ = gpm(v_w, v_l, margin=0.05)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-9)


def test_mean_preference_scores_hand_value():
    """K = 3, S = [[0, 1, 2], [-1, 0, 0.5], [-2, -0.5, 0]], tau = 0.5.
    Row sums 3, -0.5, -2.5; / K = 1, -1/6, -5/6; / tau = 2, -1/3, -5/3 (self term included, 1/K)."""
    matrix = t(0.0, 1.0, 2.0, -1.0, 0.0, 0.5, -2.0, -0.5, 0.0).reshape(1, 3, 3)
    torch.testing.assert_close(mean_preference_scores(matrix, tau=0.5), t(2.0, -1 / 3, -5 / 3)[None])


def test_mean_win_probabilities_hand_value():
    """K = 2, s(0 > 1) = 0.1, tau = 0.1: P_hat_0 = (sigma(0) + sigma(1)) / 2 = (0.5 + 0.731059) / 2 = 0.615529,
    P_hat_1 = (sigma(-1) + 0.5) / 2 = 0.384471; they sum to 1 for K = 2."""
    matrix = t(0.0, 0.1, -0.1, 0.0).reshape(2, 2)
    sigma_one = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(mean_win_probabilities(matrix, tau=0.1), t((0.5 + sigma_one) / 2, (1.5 - sigma_one) / 2))


def test_gpo_hand_value_and_gradient():
    """beta = 0.5; logratio_w = -4 - (-5) = 1, logratio_l = -6 - (-5) = -1;
    s_hat_w = 1 -> target 2, s_hat_l = -0.25 -> target -0.5;
    loss = 1/2 [(1 - 2)^2 + (-1 + 0.5)^2] = 1/2 (1 + 0.25) = 0.625;
    dL/d logp_w = 1 - 2 = -1, dL/d logp_l = -1 + 0.5 = -0.5."""
    policy_w, policy_l = t(-4.0, requires_grad=True), t(-6.0, requires_grad=True)
    loss, metrics = gpo(policy_w, policy_l, t(-5.0), t(-5.0), t(1.0), t(-0.25), beta=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.625)
    assert policy_w.grad.item() == pytest.approx(-1.0) and policy_l.grad.item() == pytest.approx(-0.5)
    assert metrics["target/winner"].item() == pytest.approx(2.0)


def test_sppo_hand_value():
    """beta = 0.5; P_hat_w = 0.75 -> (0.75 - 0.5) / 0.5 = 0.5, P_hat_l = 0.25 -> -0.5;
    logratios 1 and -1: loss = 1/2 [(1 - 0.5)^2 + (-1 + 0.5)^2] = 0.25."""
    loss, _ = sppo(t(-4.0), t(-6.0), t(-5.0), t(-5.0), t(0.75), t(0.25), beta=0.5)
    assert loss.item() == pytest.approx(0.25)


def test_sppo_rejects_targets_that_are_not_probabilities():
    with pytest.raises(ValueError, match=r"win probabilities P_hat in \[0, 1\]"):
        sppo(t(-4.0), t(-6.0), t(-5.0), t(-5.0), t(2.0), t(-0.25), beta=0.5)


def test_gpo_pipeline_from_embeddings():
    """Score matrix -> s_hat -> best / worst response -> gpo: the best has the largest target."""
    embeddings = random_embeddings(4, 5, 4, seed=7)
    targets = mean_preference_scores(gpm_score_matrix(embeddings), tau=0.1)  # [4, 5]
    best, worst = targets.argmax(-1), targets.argmin(-1)
    rows = torch.arange(4)
    target_w, target_l = targets[rows, best], targets[rows, worst]
    assert (target_w > target_l).all()
    torch.testing.assert_close(targets.sum(-1), torch.zeros(4, dtype=torch.float64))  # antisymmetry
    logps = -torch.rand(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    loss, _ = gpo(*logps, target_w, target_l, beta=0.001)
    assert loss.dim() == 0 and torch.isfinite(loss)
