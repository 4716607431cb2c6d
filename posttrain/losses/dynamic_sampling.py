"""Dynamic sampling (DAPO, Yu et al. 2025): train only on informative groups, and sample more prompts until a
step has its full batch of them.

A group (the G completions of one prompt) whose rewards are all equal has zero advantage everywhere, so it gives
no policy gradient; as a policy gets good (or stays bad) at a prompt, more groups go flat and a step shrinks.
`algo.dynamic_sampling`:
  off        train on every group (flat groups add only their KL / entropy terms)
  filter     drop flat groups; the step shrinks
  oversample drop flat groups, then run extra rollout rounds on further prompts until the step has
             `target` (= algo.prompts_per_step) informative groups over all ranks, or `max_extra_rounds` extra
             rounds are spent; surplus groups are trimmed so the step trains on exactly `target` when it can.

Under several ranks every rank runs the same number of rounds (the informative counts are summed over ranks
each round, so they agree on when to stop) and draws the same number of prompts per round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DYNAMIC_SAMPLING_MODES = ("off", "filter", "oversample")


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] rewards -> [P] bool: True where the group's rewards are not all equal (exact comparison: a group
    is dropped only when it truly has no signal; a group of one never has)."""
    return rewards.amax(-1) != rewards.amin(-1)


def extra_round_size(deficit: int, oversample_factor: float, world_size: int) -> int:
    """Prompts per rank for an extra round: ceil(deficit x oversample_factor) over all ranks, rounded up to a
    multiple of the world size. E.g. deficit 5, factor 1.5, 2 ranks: ceil(7.5) = 8 -> 4 per rank."""
    return max(1, math.ceil(math.ceil(deficit * oversample_factor) / world_size))


def extra_prompt_indices(
    num_prompts: int, per_rank: int, seed: int, update: int, extra_round: int, rank: int, world_size: int
) -> list[int]:
    """This rank's prompt indices for extra round `extra_round` (1, 2, ...) of update `update`: a permutation of
    the prompts seeded by (seed, update, round), cycled if a round wants more than there are; rank r takes the
    r-th block of `per_rank`. The same on every run and for any split of work across steps (the step's prompt
    stream); independent of the main StepPlan, so an extra prompt may also appear in some other step."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + update * 1_009 + extra_round)
    order = torch.randperm(num_prompts, generator=generator).tolist()
    start = rank * per_rank
    return [order[i % num_prompts] for i in range(start, start + per_rank)]


def allocate_groups(counts: list[int], target: int) -> list[int]:
    """How many of its informative groups each rank keeps so that they add up to min(target, sum(counts)):
    one at a time, round robin over ranks with groups left (balanced and the same on every rank).
    E.g. counts [5, 1, 3], target 6 -> [3, 1, 2]."""
    quota = [0] * len(counts)
    left = min(target, sum(counts))
    while left > 0:
        for rank, count in enumerate(counts):
            if left > 0 and quota[rank] < count:
                quota[rank] += 1
                left -= 1
    return quota


@dataclass
class RolloutRound:
    payload: Any  # what the rollout function returned beside the rewards (completions, prompts ...)
    rewards: torch.Tensor  # [P, G] of this rank's P prompts
    keep: torch.Tensor  # [P] bool: the groups this step trains on


def collect_groups(
    rollout: Callable[[list[int]], tuple[Any, torch.Tensor]],
    first_indices: list[int],
    draw_extra: Callable[[int, int], list[int]],
    all_reduce_sum: Callable[[list[float]], list[float]],
    *,
    mode: str,
    target: int,
    max_extra_rounds: int,
    oversample_factor: float,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[RolloutRound], dict[str, float]]:
    """Rollout rounds of one step under dynamic sampling `mode` (module docstring).

    rollout(prompt indices) -> (payload, rewards [P, G]) samples and scores this rank's prompts;
    draw_extra(extra_round, per_rank) -> this rank's prompt indices for an extra round; all_reduce_sum sums a
    list of floats over ranks. The first round samples `first_indices`.
    Returns the rounds (with the groups to train on marked in `keep`) and, summed over ranks: groups_sampled,
    groups_kept, groups_dropped, extra_rounds, prompts_sampled (per step; the same on every rank)."""
    rounds: list[RolloutRound] = []
    counts, sampled, extra_rounds, indices = [0] * world_size, 0, 0, first_indices
    while True:
        payload, rewards = rollout(indices)
        informative = informative_groups(rewards) if mode != "off" else torch.ones(len(rewards), dtype=torch.bool)
        rounds.append(RolloutRound(payload, rewards, informative))
        mine = [0.0] * (world_size + 1)
        mine[rank], mine[world_size] = float(informative.sum()), float(len(rewards))
        totals = all_reduce_sum(mine)
        counts = [count + round(new) for count, new in zip(counts, totals[:world_size])]
        sampled += round(totals[world_size])
        deficit = target - sum(counts)
        if mode != "oversample" or deficit <= 0 or extra_rounds >= max_extra_rounds:
            break
        extra_rounds += 1
        indices = draw_extra(extra_rounds, extra_round_size(deficit, oversample_factor, world_size))
    if mode == "oversample":  # trim the surplus: keep this rank's first `quota` informative groups, in draw order
        quota = allocate_groups(counts, target)[rank]
        for rollout_round in rounds:
            kept_before = torch.cumsum(rollout_round.keep.long(), 0)
            rollout_round.keep = rollout_round.keep & (kept_before <= quota)
            quota -= int(rollout_round.keep.sum())
    kept = sum(allocate_groups(counts, target)) if mode == "oversample" else sum(counts)
    stats = {
        "groups_sampled": float(sampled),
        "groups_kept": float(kept),
        "groups_dropped": float(sampled - kept),
        "extra_rounds": float(extra_rounds),
    }
    return rounds, stats


def dynamic_sampling_problems(mode: str, max_extra_rounds: int, oversample_factor: float) -> list[str]:
    """Config problems of algo.dynamic_sampling, algo.max_extra_rounds and algo.oversample_factor."""
    if mode not in DYNAMIC_SAMPLING_MODES:
        return [f"algo.dynamic_sampling={mode!r} must be one of {', '.join(DYNAMIC_SAMPLING_MODES)}"]
    problems = []
    if max_extra_rounds < 0:
        problems.append(f"algo.max_extra_rounds={max_extra_rounds} must be >= 0 (extra rollout rounds per step)")
    if not oversample_factor >= 1.0:
        problems.append(
            f"algo.oversample_factor={oversample_factor} must be >= 1: an extra round samples "
            "ceil(missing groups x factor) prompts"
        )
    return problems
