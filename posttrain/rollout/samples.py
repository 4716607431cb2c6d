"""What trainers that sample make of completions: training examples, groups per prompt, the engine's start dir."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.errors import ConfigError
from posttrain.rollout.completion import Completion
from posttrain.rollout.config import SamplingConfig
from posttrain.rollout.service import RolloutService


def completion_example(completion: Completion) -> TokenizedExample:
    """prompt + completion ids with labels on the completion tokens (its EOS included when it stopped)."""
    ids = list(completion.prompt_token_ids) + list(completion.token_ids)
    return TokenizedExample(ids, [IGNORE_INDEX] * len(completion.prompt_token_ids) + list(completion.token_ids))


def grouped_completions(rollout: RolloutService, prompts: Sequence, sampling: SamplingConfig) -> list[list[Completion]]:
    """Completions per prompt: P lists of `sampling.n` completions, in prompt order (P may be 0).

    Every rank calls it, also with no prompts: in a rollout group that rank still joins the group's generate."""
    groups: list[list[Completion]] = [[] for _ in prompts]
    for completion in rollout.generate(prompts, sampling):
        groups[completion.prompt_index].append(completion)
    return groups


def lora_rank(cfg) -> int | None:
    """The policy's LoRA rank (peft=lora), which lets a vLLM engine take adapters (rollout.lora_sync=adapter)."""
    return cfg.peft.r if cfg.peft.enabled else None


def rollout_model_dir(cfg, run_dir: Path, policy: nn.Module, tokenizer) -> str:
    """Where a rollout engine loads its first weights: `model.path`, else the initial policy exported to
    `<run_dir>/rollout_init` (a model built from config has no directory of its own). An engine that takes
    LoRA adapters gets the base model without them (adapters arrive with every sync)."""
    from posttrain.engine.export import export_hf

    if cfg.model.path:
        return cfg.model.path
    init_dir = Path(run_dir) / "rollout_init"
    if lora_rank(cfg) and cfg.rollout.lora_sync == "adapter" and cfg.rollout.backend == "vllm":
        export_base_model(policy, tokenizer, init_dir, cfg.deepspeed.zero_stage)
    else:
        export_hf(policy, tokenizer, init_dir, cfg.deepspeed.zero_stage)
    return str(init_dir)


def export_base_model(peft_policy: nn.Module, tokenizer, out_dir: Path, zero_stage: int) -> None:
    """The base model of a LoRA policy, adapters left out, as a Hugging Face directory (written by rank 0)."""
    import shutil

    from posttrain.engine.distributed import barrier, is_main_process
    from posttrain.engine.export import gathered_parameters
    from posttrain.models.logprob_model import base_causal_lm
    from posttrain.rollout.weights import transformers_name

    state = None
    with gathered_parameters(peft_policy, zero_stage):
        if is_main_process():
            entries = peft_policy.get_base_model().state_dict().items()
            state = {transformers_name(n): t.detach().to("cpu", copy=True) for n, t in entries if transformers_name(n)}
    if is_main_process():
        shutil.rmtree(out_dir, ignore_errors=True)
        base_causal_lm(peft_policy).save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    barrier()


@dataclass
class PolicySample:
    """One sampled completion as a policy-gradient training example."""

    example: TokenizedExample  # prompt + completion ids; labels on completion tokens only
    prompt_length: int
    advantage: float
    rollout_logprobs: list[float] = field(default_factory=list)  # the engine's, per completion token
    old_logprobs: torch.Tensor | None = None  # [L] the trainer's before the update (None: the step's own)
    reference_logprobs: torch.Tensor | None = None  # [L] the KL reference's


def grouped_by_prompt(samples: Sequence[PolicySample]) -> list[PolicySample]:
    """`samples` with those of the same prompt next to each other (prompts in order of first appearance, samples
    in their order within a prompt), so that a micro-batch split keeps groups whole for shared-prompt forwards."""
    groups: dict[tuple[int, ...], list[PolicySample]] = {}
    for sample in samples:
        groups.setdefault(tuple(sample.example.input_ids[: sample.prompt_length]), []).append(sample)
    return [sample for group in groups.values() for sample in group]


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


def load_or_draw_samples(
    path: Path, rollout: RolloutService, prompts: Sequence, sampling: SamplingConfig, resumed: bool
) -> list[list[str]]:
    """Response texts per prompt kept at `path` (jsonl: prompt, responses), or drawn now and written atomically.
    A resumed run must find them (it compares against the same samples), so a missing file then is an error."""
    path = Path(path)
    if path.exists():
        return [json.loads(line)["responses"] for line in path.read_text().splitlines() if line.strip()]
    if resumed:
        raise ConfigError(f"{path} is missing: a resumed run compares against the samples saved there")
    groups = grouped_completions(rollout, list(prompts), sampling)  # also with none: the group generates
    samples = [[completion.text for completion in group] for group in groups]
    staging = path.with_suffix(".tmp")
    staging.write_text("".join(json.dumps({"prompt": p, "responses": r}) + "\n" for p, r in zip(prompts, samples)))
    staging.replace(path)
    return samples
