"""Prompts -> token ids the engine sees: the trainers' chat template, then the length policy."""

from __future__ import annotations

from collections.abc import Sequence

from posttrain.data.chat import render_ids, validate_messages
from posttrain.errors import ConfigError, DataError

# A prompt is a chat conversation [{"role", "content"}, ...] (rendered with the generation prompt) or
# token ids used as they are.
Prompt = Sequence[dict] | Sequence[int]


def prompt_token_ids(tokenizer, prompt: Prompt, prompt_index: int) -> list[int]:
    """Token ids of one prompt, rendered exactly as trainers render it (`render_ids(...,
    add_generation_prompt=True)`)."""
    if isinstance(prompt, str):
        raise DataError(
            f"prompt {prompt_index} is a string; pass chat messages [{{'role': 'user', 'content': ...}}] or token ids"
        )
    items = list(prompt)
    if items and all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        return items
    if items and all(isinstance(item, dict) for item in items):
        messages = validate_messages({"messages": items}, f"prompt {prompt_index}", need_assistant=False)
        return render_ids(tokenizer, messages, add_generation_prompt=True)
    raise DataError(
        f"prompt {prompt_index} is neither chat messages [{{'role': ..., 'content': ...}}, ...] nor a non-empty "
        "list of token ids"
    )


def fit_prompt(ids: list[int], prompt_index: int, max_tokens: int, max_model_len: int, truncation: str) -> list[int]:
    """`ids` if prompt + `max_tokens` fits in `max_model_len`; else an error, or its last tokens (truncation="left")."""
    room = max_model_len - max_tokens
    if room < 1:
        raise ConfigError(
            f"sampling max_tokens={max_tokens} leaves no room for a prompt in rollout.max_model_len={max_model_len}; "
            "lower max_tokens or raise rollout.max_model_len"
        )
    if len(ids) <= room:
        return ids
    if truncation == "left":
        return ids[-room:]
    if truncation == "error":
        raise DataError(
            f"prompt {prompt_index} has {len(ids)} tokens; with max_tokens={max_tokens} it needs "
            f"{len(ids) + max_tokens} > rollout.max_model_len={max_model_len}. Shorten the prompt, lower "
            "max_tokens, raise rollout.max_model_len or set rollout.prompt_truncation=left"
        )
    raise ConfigError(f"rollout.prompt_truncation={truncation!r} is not one of error, left")


def prepare_prompts(
    tokenizer, prompts: Sequence[Prompt], max_tokens: int, max_model_len: int, truncation: str
) -> list[list[int]]:
    """Engine-ready token ids for every prompt, in order."""
    if isinstance(prompts, (str, dict)) or not len(prompts):
        raise DataError("generate needs a non-empty list of prompts (each chat messages or token ids)")
    return [
        fit_prompt(prompt_token_ids(tokenizer, prompt, index), index, max_tokens, max_model_len, truncation)
        for index, prompt in enumerate(prompts)
    ]
