"""Overlong completions (those cut at the token budget): mask them out of the loss, or shape their reward.

DAPO (Yu et al. 2025) offers both: "overlong filtering" (a truncated sample has no final answer, so its reward
says nothing about its reasoning: leave it out of the loss) and the soft overlong punishment below.
"""

from __future__ import annotations

import torch

OVERLONG_MODES = ("off", "mask", "soft_penalty")


def soft_overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward, for response lengths |y| (tokens) under the budget
    L_max = max_tokens with the soft zone L_cache = buffer:

        R(y) = 0                                   if |y| <= L_max - L_cache
             = factor * ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             = -factor                             if |y| > L_max

    i.e. 0 up to L_max - L_cache, then linear down to -factor at |y| = L_max (the paper: factor 1 against
    rewards +-1). lengths [N] (any numeric dtype) -> float64 [N]."""
    lengths = lengths.to(torch.float64)
    start = float(max_tokens - buffer)
    ramp = (start - lengths) / float(buffer)
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    return factor * torch.where(lengths > max_tokens, torch.full_like(lengths, -1.0), penalty)


def trainable_completions(finished: list[bool], mode: str) -> list[bool]:
    """Which completions enter the loss: with mode `mask` only those that stopped (finish_reason "stop"),
    else all. Truncated ones still count in their group's reward statistics (the advantages)."""
    return [f or mode != "mask" for f in finished]


def overlong_problems(mode: str, buffer: int, max_tokens: int, factor: float) -> list[str]:
    """Config problems of algo.overlong, algo.overlong_buffer (L_cache) and algo.overlong_penalty_factor."""
    if mode not in OVERLONG_MODES:
        return [f"algo.overlong={mode!r} must be one of {', '.join(OVERLONG_MODES)}"]
    if mode != "soft_penalty":
        return []
    problems = []
    if not 0 < buffer < max_tokens:
        problems.append(
            f"algo.overlong_buffer={buffer} must be > 0 and < algo.sampling.max_tokens={max_tokens} "
            "(the soft zone is the last overlong_buffer tokens of the budget)"
        )
    if factor < 0:
        problems.append(f"algo.overlong_penalty_factor={factor} must be >= 0 (the penalty reaches -factor)")
    return problems
