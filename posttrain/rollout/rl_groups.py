"""One RL step's training groups: rollout rounds under dynamic sampling, verifier rewards with DAPO's overlong
shaping, group advantages, and the completions that enter the loss (posttrain.losses.dynamic_sampling and
posttrain.losses.overlong hold the rules; this module only runs them against the rollout service)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.engine.distributed import all_reduce_sum, rank, world_size
from posttrain.losses.dynamic_sampling import collect_groups, dynamic_sampling_problems, extra_prompt_indices
from posttrain.losses.overlong import overlong_problems, soft_overlong_penalty, trainable_completions
from posttrain.losses.policy import IMPORTANCE_LEVELS, group_advantages
from posttrain.losses.rollout_correction import rollout_correction_problems
from posttrain.rewards.reward import score_completions
from posttrain.rollout.config import SamplingConfig, sampling_for_step
from posttrain.rollout.samples import PolicySample, policy_samples

MAX_ROUNDS_PER_UPDATE = 1024  # seeds of update u's rounds: u * 1024 + round


@dataclass
class TrainingGroups:
    samples: list[PolicySample]  # this rank's completions that enter the loss
    rewards: torch.Tensor  # [groups sampled on this rank (all rounds), n]: shaped rewards, for the step metrics
    kept_groups: int  # this rank's groups trained on
    counts: dict[str, int]  # score_completions' counts, summed over this rank's rounds
    stats: dict[str, float]  # over all ranks: groups_sampled / kept / dropped, extra_rounds, overlong_masked


def sample_training_groups(
    rollout, prompts: Sequence, first_indices: list[int], algo, seed: int, update: int, rollout_seed: int = 0
):
    """Sample, score and select the groups of update `update` from `prompts` (PromptRows; this rank starts with
    prompts[first_indices]) under the RLVR settings `algo`: sampling, verification_reward, nonstop_penalty,
    verifier_timeout_s, advantage, dynamic_sampling (+ prompts_per_step as the target over all ranks,
    max_extra_rounds, oversample_factor) and overlong (+ overlong_buffer, overlong_penalty_factor).
    Extra rounds draw from extra_prompt_indices(seed, update, round). Each round samples with its own seed derived
    from (rollout_seed or algo.sampling.seed, update, round, rank), so a resumed run draws the same samples.
    Returns TrainingGroups."""
    sampling = SamplingConfig(**algo.sampling)
    round_number = 0

    def one_round(indices: list[int]):
        nonlocal round_number
        round_prompts = [prompts[i] for i in indices]
        request = sampling_for_step(sampling, rollout_seed, update * MAX_ROUNDS_PER_UPDATE + round_number, rank())
        round_number += 1
        completions = rollout.generate([p.prompt for p in round_prompts], request)
        rewards, counts = score_completions(
            round_prompts, completions, algo.verification_reward, algo.nonstop_penalty, algo.verifier_timeout_s
        )
        rewards = torch.tensor(rewards)
        if algo.overlong == "soft_penalty":
            lengths = torch.tensor([len(c.token_ids) for c in completions])
            buffer, factor = algo.overlong_buffer, algo.overlong_penalty_factor
            rewards = rewards + soft_overlong_penalty(lengths, sampling.max_tokens, buffer, factor).float()
        return (completions, counts), rewards.view(len(round_prompts), sampling.n)

    def draw_extra(extra_round: int, per_rank: int) -> list[int]:
        return extra_prompt_indices(len(prompts), per_rank, seed, update, extra_round, rank(), world_size())

    rounds, stats = collect_groups(
        one_round, first_indices, draw_extra, all_reduce_sum, mode=algo.dynamic_sampling,
        target=algo.prompts_per_step, max_extra_rounds=algo.max_extra_rounds,
        oversample_factor=algo.oversample_factor, rank=rank(), world_size=world_size(),
    )  # fmt: skip
    samples, counts, masked = [], {}, 0
    for rollout_round in rounds:
        completions, round_counts = rollout_round.payload
        counts = {key: counts.get(key, 0) + value for key, value in round_counts.items()}
        advantages, _ = group_advantages(rollout_round.rewards, mode=algo.advantage)
        trainable = trainable_completions([c.finish_reason == "stop" for c in completions], algo.overlong)
        kept = [c for c, ok in zip(completions, trainable) if ok]
        masked += sum(bool(rollout_round.keep[c.prompt_index]) for c, ok in zip(completions, trainable) if not ok)
        samples += policy_samples(kept, advantages, rollout_round.keep)
    stats["overlong_masked"] = all_reduce_sum([float(masked)])[0]
    rewards = torch.cat([r.rewards for r in rounds])
    return TrainingGroups(samples, rewards, sum(int(r.keep.sum()) for r in rounds), counts, stats)


def rl_option_problems(algo) -> list[str]:
    """One-line problems of the RLVR options beyond GRPO's: algo.dynamic_sampling (+ max_extra_rounds,
    oversample_factor), algo.overlong (+ overlong_buffer against sampling.max_tokens, overlong_penalty_factor),
    algo.importance_level and algo.rollout_correction (+ rollout_correction_cap; an unknown name raises)."""
    modes = {key: getattr(algo, key) for key in ("dynamic_sampling", "overlong", "rollout_correction")}
    unquoted = [f"algo.{key}={mode!r}: quote the mode in YAML ('off'); bare off is a boolean there" for key, mode in
                modes.items() if mode in ("False", "True")]  # fmt: skip
    if unquoted:
        return unquoted
    problems = dynamic_sampling_problems(algo.dynamic_sampling, algo.max_extra_rounds, algo.oversample_factor)
    problems += overlong_problems(
        algo.overlong, algo.overlong_buffer, algo.sampling.max_tokens, algo.overlong_penalty_factor
    )
    if algo.importance_level not in IMPORTANCE_LEVELS:
        levels = ", ".join(IMPORTANCE_LEVELS)
        problems.append(f"algo.importance_level={algo.importance_level!r} must be one of {levels} (sequence: GSPO)")
    return problems + rollout_correction_problems(algo.rollout_correction, algo.rollout_correction_cap)
