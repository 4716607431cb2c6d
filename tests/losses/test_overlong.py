"""Overlong handling: DAPO's soft penalty at its edges, masking truncated completions, config checks."""

import pytest
import torch

from posttrain.losses.overlong import overlong_problems, soft_overlong_penalty, trainable_completions


def test_soft_penalty_edges():
    """L_max = 10, L_cache = 4, factor 2: zero up to 10 - 4 = 6 tokens; then (6 - |y|) / 4 x 2:
    7 -> -0.5, 8 -> -1.0, 9 -> -1.5; -2 at the budget (10) and beyond (11)."""
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11])
    penalty = soft_overlong_penalty(lengths, max_tokens=10, buffer=4, factor=2.0)
    expected = torch.tensor([0.0, 0.0, 0.0, -0.5, -1.0, -1.5, -2.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(penalty, expected)


def test_soft_penalty_one_token_zone():
    """L_cache = 1: only a completion of exactly L_max tokens is punished, fully."""
    penalty = soft_overlong_penalty(torch.tensor([8, 9, 10]), max_tokens=10, buffer=1, factor=1.0)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64))


def test_mask_drops_truncated_completions_only_in_mask_mode():
    finished = [True, False, True]
    assert trainable_completions(finished, "mask") == [True, False, True]
    assert trainable_completions(finished, "off") == [True, True, True]
    assert trainable_completions(finished, "soft_penalty") == [True, True, True]


@pytest.mark.parametrize(
    "mode, buffer, factor, message",
    [
        ("truncate", 8, 1.0, "algo.overlong='truncate' must be one of off, mask, soft_penalty"),
        ("soft_penalty", 64, 1.0, "algo.overlong_buffer=64 must be > 0 and < algo.sampling.max_tokens=64"),
        ("soft_penalty", 0, 1.0, "algo.overlong_buffer=0 must be > 0"),
        ("soft_penalty", 8, -1.0, "algo.overlong_penalty_factor=-1.0 must be >= 0"),
    ],
)
def test_config_problems(mode, buffer, factor, message):
    problems = overlong_problems(mode, buffer, 64, factor)
    assert len(problems) == 1 and problems[0].startswith(message)


def test_valid_configs_have_no_problems():
    assert overlong_problems("soft_penalty", 16, 64, 1.0) == []
    assert overlong_problems("mask", 0, 64, 1.0) == []  # the buffer only matters for the soft penalty
