"""Preference annotation without a trained reward model: CDR, strong-over-weak density ratios.

    posttrain annotate --method cdr --strong A --weak B --prompts P --out O [--k K] [--criteria "..."]

CDR ("Customizable Density Ratios of Strong-over-weak LLMs for Preference Annotation"; REFERENCE.md section 7):
the reward of a response y to a prompt x is
    r(x, y) = log pi_strong(y | x') - log pi_weak(y | x),
the summed log-probs of y's tokens (its end-of-turn token included) under each model's own chat template and
tokenizer, with x' = x preceded by a system message holding `--criteria` when given (the strong side only).
For each prompt the best and the worst of its responses by r become one preference row in the project's format
    {"prompt": [...], "chosen": [assistant], "rejected": [assistant], "cdr_reward": {"chosen": r_w, "rejected": r_l}}
(other fields of the input row are kept). Responses come from the row ("chosen" and "rejected" of a preference
row, or a "responses" list of strings), else K are sampled from `--sampler` (default: the strong model) through
the rollout service. Prompts whose responses all score the same give no row.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from posttrain.data.chat import render_ids
from posttrain.data.preference import split_prompt, tokenize_response
from posttrain.data.prompts import prompt_messages
from posttrain.data.sources import read_file
from posttrain.errors import DataError


def response_text(value, where: str) -> str:
    """A response given as a string, or as assistant messages (the last one's content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    raise DataError(f"{where}: a response must be a string or chat messages ending with an assistant turn")


def prompt_and_responses(row: dict, where: str) -> tuple[list[dict], list[str] | None]:
    """(prompt messages, the row's own responses or None): a preference row's chosen and rejected (either
    preference format), a "responses" list, or none (a prompt row: "prompt" or "messages")."""
    if isinstance(row, dict) and "chosen" in row and "rejected" in row:
        prompt, chosen, rejected = split_prompt(row, where)
        return prompt, [response_text(chosen, f"{where} chosen"), response_text(rejected, f"{where} rejected")]
    prompt = prompt_messages(row, where)
    if isinstance(row.get("responses"), list):
        return prompt, [response_text(value, f"{where} responses[{i}]") for i, value in enumerate(row["responses"])]
    return prompt, None


class ScoringModel:
    """A causal LM and its tokenizer, giving summed response log-probs sum_t log pi(y_t | x, y_<t)."""

    def __init__(self, path: str | Path, dtype: str = "float32", fused: bool = False):
        from posttrain.config import ModelConfig
        from posttrain.models.attention import use_packed_sdpa
        from posttrain.models.loading import load_tokenizer, torch_dtype
        from posttrain.models.logprob_model import CausalLMWithLogprobs

        self.tokenizer = load_tokenizer(ModelConfig(path=str(path)), None, None)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
        # posttrain's packed sdpa where the model type allows: responses to one prompt then share its forward
        self.model = CausalLMWithLogprobs(use_packed_sdpa(model.eval().requires_grad_(False)), fused=fused)

    def response_logprobs(
        self, prompts: Sequence[list[dict]], responses: Sequence[str], batch_size: int = 32
    ) -> torch.Tensor:
        """[N] summed log-probs of responses[i] after prompts[i] (float32)."""
        from posttrain.models.logprobs import completion_logprob_rows

        examples, prompt_lengths = [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            prompt_ids = render_ids(self.tokenizer, prompt, add_generation_prompt=True)
            message = [{"role": "assistant", "content": response}]
            examples.append(tokenize_response(self.tokenizer, prompt, message, prompt_ids, f"response {i}"))
            prompt_lengths.append(len(prompt_ids))
        share = self.model.shares_prompts  # the K responses to a prompt put it in the forward once
        rows = completion_logprob_rows(self.model, examples, prompt_lengths, batch_size, share_prompts=share)
        return torch.stack([row.sum() for row in rows]) if rows else torch.zeros(0)


def with_criteria(prompt: list[dict], criteria: str | None) -> list[dict]:
    """The prompt the strong model reads: a system message with the criteria first (merged into an existing one)."""
    if not criteria:
        return prompt
    if prompt and prompt[0]["role"] == "system":
        return [{"role": "system", "content": criteria + "\n\n" + prompt[0]["content"]}, *prompt[1:]]
    return [{"role": "system", "content": criteria}, *prompt]


def density_ratio_rewards(
    strong: ScoringModel,
    weak: ScoringModel,
    prompts: Sequence[list[dict]],
    responses: Sequence[Sequence[str]],
    criteria: str | None = None,
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """r(x, y) = log pi_strong(y | criteria + x) - log pi_weak(y | x) for every response of every prompt."""
    flat_prompts = [prompt for prompt, group in zip(prompts, responses) for _ in group]
    flat_responses = [response for group in responses for response in group]
    strong_prompts = [with_criteria(prompt, criteria) for prompt in flat_prompts]
    rewards = strong.response_logprobs(strong_prompts, flat_responses, batch_size)
    rewards = rewards - weak.response_logprobs(flat_prompts, flat_responses, batch_size)
    return list(torch.split(rewards, [len(group) for group in responses]))


def preference_rows(rows: Sequence[dict], prompts, responses, rewards) -> list[dict]:
    """One row per prompt: chosen = the highest-reward response, rejected = the lowest (ties: none)."""
    out = []
    for row, prompt, group, reward in zip(rows, prompts, responses, rewards):
        best, worst = int(reward.argmax()), int(reward.argmin())
        if reward[best] == reward[worst]:
            continue
        extra = {k: v for k, v in row.items() if k not in ("prompt", "messages", "chosen", "rejected", "responses")}
        out.append({
            **extra, "prompt": prompt,
            "chosen": [{"role": "assistant", "content": group[best]}],
            "rejected": [{"role": "assistant", "content": group[worst]}],
            "cdr_reward": {"chosen": float(reward[best]), "rejected": float(reward[worst])},
        })  # fmt: skip
    return out


def sample_responses(model_dir: str, prompts: Sequence[list[dict]], k: int, args) -> list[list[str]]:
    """K responses per prompt from `model_dir` through the rollout service."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_tokenizer
    from posttrain.rollout.config import RolloutConfig, SamplingConfig
    from posttrain.rollout.samples import grouped_completions
    from posttrain.rollout.service import build_rollout_service

    tokenizer = load_tokenizer(ModelConfig(path=model_dir), None, None)
    rollout = build_rollout_service(RolloutConfig(backend=args.backend, seed=args.seed), model_dir, tokenizer)
    sampling = SamplingConfig(n=k, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    try:
        return [[c.text for c in group] for group in grouped_completions(rollout, list(prompts), sampling)]
    finally:
        rollout.close()  # the scoring models load next: the sampler's engine frees its memory first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain annotate", description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="cdr", choices=("cdr",))
    parser.add_argument("--strong", required=True, help="the strong model (a Hugging Face dir or hub name)")
    parser.add_argument("--weak", required=True, help="the weak model")
    parser.add_argument("--prompts", required=True, type=Path, help="rows with prompts (and optionally responses)")
    parser.add_argument("--out", required=True, type=Path, help="preference rows, JSONL")
    parser.add_argument("--k", type=int, default=4, help="responses sampled per prompt without given ones")
    parser.add_argument("--criteria", help="a system prompt for the strong model (what a good response is)")
    parser.add_argument("--sampler", help="the model that samples responses (default: --strong)")
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="responses per scoring forward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.k < 2:
        raise DataError(f"--k {args.k} must be >= 2: a pair needs two responses")
    source = read_file(args.prompts)
    rows = [r.row for r in source]
    prompts, responses = map(list, zip(*(prompt_and_responses(r.row, r.where()) for r in source)))
    missing = [i for i, group in enumerate(responses) if group is None]
    if missing:
        sampled = sample_responses(args.sampler or args.strong, [prompts[i] for i in missing], args.k, args)
        for i, group in zip(missing, sampled):
            responses[i] = group
    strong, weak = ScoringModel(args.strong), ScoringModel(args.weak)
    rewards = density_ratio_rewards(strong, weak, prompts, responses, args.criteria, args.batch_size)
    out = preference_rows(rows, prompts, responses, rewards)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in out))
    print(f"cdr: {len(out)} preference rows from {len(rows)} prompts -> {args.out}")
    if all(isinstance(row, dict) and "chosen" in row for row in rows):  # given pairs: how often CDR keeps the label
        agree = sum(float(reward[0] > reward[1]) + 0.5 * float(reward[0] == reward[1]) for reward in rewards)
        print(f"cdr: agrees with the given chosen/rejected label on {agree:g} of {len(rows)} pairs "
              f"({agree / max(len(rows), 1):.3f}; a tie counts 1/2)")  # fmt: skip
    return 0
