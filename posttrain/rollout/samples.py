"""What trainers that sample make of completions: training examples, groups per prompt, the engine's start dir."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.rollout.completion import Completion
from posttrain.rollout.config import SamplingConfig
from posttrain.rollout.service import RolloutService


def completion_example(completion: Completion) -> TokenizedExample:
    """prompt + completion ids with labels on the completion tokens (its EOS included when it stopped)."""
    ids = list(completion.prompt_token_ids) + list(completion.token_ids)
    return TokenizedExample(ids, [IGNORE_INDEX] * len(completion.prompt_token_ids) + list(completion.token_ids))


def grouped_completions(rollout: RolloutService, prompts: Sequence, sampling: SamplingConfig) -> list[list[Completion]]:
    """Completions per prompt: P lists of `sampling.n` completions, in prompt order."""
    groups: list[list[Completion]] = [[] for _ in prompts]
    for completion in rollout.generate(prompts, sampling):
        groups[completion.prompt_index].append(completion)
    return groups


def rollout_model_dir(cfg, run_dir: Path, policy: nn.Module, tokenizer) -> str:
    """Where a rollout engine loads its first weights: `model.path`, else the initial policy exported to
    `<run_dir>/rollout_init` (a model built from config has no directory of its own)."""
    from posttrain.engine.export import export_hf

    if cfg.model.path:
        return cfg.model.path
    init_dir = Path(run_dir) / "rollout_init"
    export_hf(policy, tokenizer, init_dir, cfg.deepspeed.zero_stage)
    return str(init_dir)


@dataclass
class PolicySample:
    """One sampled completion as a policy-gradient training example."""

    example: TokenizedExample  # prompt + completion ids; labels on completion tokens only
    prompt_length: int
    advantage: float
    rollout_logprobs: list[float] = field(default_factory=list)  # the engine's, per completion token
    old_logprobs: torch.Tensor | None = None  # [L] the trainer's before the update (None: the step's own)
    reference_logprobs: torch.Tensor | None = None  # [L] the KL reference's


def policy_samples(
    completions: Sequence[Completion], advantages: torch.Tensor, keep: torch.Tensor
) -> list[PolicySample]:
    """The completions of kept groups (keep[prompt]) with their advantages [P, n]; empty completions are dropped."""
    samples = []
    for completion in completions:
        if keep[completion.prompt_index] and completion.token_ids:
            advantage = float(advantages[completion.prompt_index, completion.sample_index])
            samples.append(
                PolicySample(
                    completion_example(completion),
                    len(completion.prompt_token_ids),
                    advantage,
                    list(completion.logprobs),
                )  # fmt: skip
            )
    return samples
