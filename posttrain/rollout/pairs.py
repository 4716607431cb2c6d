"""Preference pairs made on-policy: K sampled responses per prompt, scored by an oracle, (best, worst) kept.

Self-play trainers (GPO / SPPO, online DPO) sample K responses per prompt through the RolloutService, give
every response a scalar target (a GPM's mean preference score, a win probability, a verifier's reward) and
train on the pair of the best and the worst response of each prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data.preference import PreferenceExample
from posttrain.models.logprobs import idle_example
from posttrain.rollout.completion import Completion
from posttrain.rollout.samples import completion_example


@dataclass
class SampledPairs:
    """One (best, worst) pair per prompt, with the targets that ranked them and the engine's log-probs."""

    examples: list[PreferenceExample]  # chosen = the best response, rejected = the worst
    target_w: torch.Tensor  # [N] the best / worst response's target
    target_l: torch.Tensor
    engine_w: torch.Tensor  # [N] the rollout engine's summed log-probs of the same responses (as sampled)
    engine_l: torch.Tensor
    reference_w: torch.Tensor | None = None  # [N] a reference's summed log-probs, filled in by the trainer
    reference_l: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> SampledPairs:
        """The pairs where the boolean mask `keep` [N] is true (reference log-probs too, when filled in)."""
        index = keep.nonzero().flatten()
        return SampledPairs(
            [self.examples[i] for i in index.tolist()],
            *(None if t is None else t[index] for t in (self.target_w, self.target_l, self.engine_w, self.engine_l)),
            *(None if t is None else t[index] for t in (self.reference_w, self.reference_l)),
        )


def margin_pairs(groups: list[list[Completion]], targets: torch.Tensor, min_margin: float) -> SampledPairs:
    """The (best, worst) pair of each prompt (`best_worst_pairs`) kept only where the oracle's gap
    target_best - target_worst exceeds `min_margin` (DNO's large-margin pairs, Rosset et al. 2024); with
    min_margin >= 0 a group whose K responses all score the same gives no pair."""
    pairs = best_worst_pairs(groups, targets)
    return pairs.select(pairs.target_w - pairs.target_l > min_margin)


def best_worst_pairs(groups: list[list[Completion]], targets: torch.Tensor) -> SampledPairs:
    """The (argmax, argmin) response of each prompt's group by `targets` [P, K] (ties: the first index)."""
    best, worst = targets.argmax(-1), targets.argmin(-1)
    examples, engine_w, engine_l = [], [], []
    for group, b, w in zip(groups, best.tolist(), worst.tolist()):
        prompt_length = len(group[b].prompt_token_ids)
        examples.append(PreferenceExample(completion_example(group[b]), completion_example(group[w]), prompt_length))
        engine_w.append(sum(group[b].logprobs))
        engine_l.append(sum(group[w].logprobs))
    rows = torch.arange(len(groups))
    return SampledPairs(
        examples,
        targets[rows, best].float(),
        targets[rows, worst].float(),
        torch.tensor(engine_w, dtype=torch.float32),
        torch.tensor(engine_l, dtype=torch.float32),
    )


def stand_in_pairs(token_id: int) -> SampledPairs:
    """One two-token pair (chosen = rejected = `idle_example`), every target and log-prob 0: what a rank with no
    pair of its own runs the pair loss on in a zero-weight micro-step (`training.idle_micro_step`)."""
    example = idle_example(token_id)
    zero = torch.zeros(1)
    return SampledPairs([PreferenceExample(example, example, 1)], zero, zero, zero, zero, zero, zero)


def group_statistics(groups: list[list[Completion]], pairs: SampledPairs) -> dict[str, float]:
    """Sums over this rank's groups (all-reduce them, then divide): samples, tokens, truncations, target margin,
    pairs whose two responses are identical."""
    completions = [completion for group in groups for completion in group]
    return {
        "samples": float(len(completions)),
        "response_tokens": float(sum(len(c.token_ids) for c in completions)),
        "truncated": float(sum(c.finish_reason != "stop" for c in completions)),
        "target_margin_sum": float((pairs.target_w - pairs.target_l).sum()),
        "identical_pairs": float(sum(e.chosen.input_ids == e.rejected.input_ids for e in pairs.examples)),
    }


def group_metrics(totals: dict[str, float], group_size: int) -> dict[str, float]:
    """Step metrics from `group_statistics` sums over all ranks."""
    samples = max(totals["samples"], 1.0)
    prompts = samples / group_size
    return {
        "target_margin": totals["target_margin_sum"] / prompts,
        "identical_pair_fraction": totals["identical_pairs"] / prompts,
        "response_length": totals["response_tokens"] / samples,
        "truncated_fraction": totals["truncated"] / samples,
    }
