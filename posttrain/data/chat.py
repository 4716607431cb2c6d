"""Chat conversations -> token ids with assistant-only labels.

Masks are found by rendering growing prefixes of the conversation with the tokenizer's own chat
template, so they are right for any template (hub models included), multi-turn as well: the tokens
between "messages[:i] + generation prompt" and "messages[:i+1]" are assistant turn i (up to and
including its end-of-sequence token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.errors import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class TokenizedExample:
    """One tokenised sequence. The fields are lists, or `array("i")` where many are held at once (SFT data):
    both index, slice and extend a list alike, but an array never equals a list (`==`): compare `list(...)`s."""

    input_ids: list[int]
    labels: list[int]  # input_ids at assistant positions, IGNORE_INDEX elsewhere (not shifted)

    @property
    def num_target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def validate_messages(row: Any, where: str, field: str = "messages", need_assistant: bool = True) -> list[dict]:
    """The row's conversation, or a DataError naming `where` and what to fix."""
    if not isinstance(row, dict) or field not in row:
        raise DataError(f'{where} has no "{field}" field; expected chat format [{{"role": ..., "content": ...}}, ...]')
    messages = row[field]
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "{field}" must be a non-empty list of {{"role", "content"}} objects')
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f'{where}: message {turn} must be an object with "role" and "content"')
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: message {turn} has unknown role {message['role']!r}; known roles: {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {turn} content must be a string")
    if need_assistant and not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained on")
    return messages


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer, messages: list[dict], where: str = "conversation") -> TokenizedExample:
    """Token ids of the whole conversation and labels that keep only assistant tokens."""
    input_ids = render_ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(input_ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_ids(tokenizer, messages[:turn], add_generation_prompt=True))
        through = render_ids(tokenizer, messages[: turn + 1])
        if input_ids[: len(through)] != through:
            raise DataError(
                f"{where}: the chat template does not render turn {turn} as a prefix of the whole conversation; "
                f"assistant masks cannot be derived"
            )
        end = len(through)
        # Stop at the turn's end-of-sequence token: template text after it (e.g. a newline) is not
        # something the model should learn to generate.
        turn_ids = input_ids[start:end]
        if tokenizer.eos_token_id in turn_ids:
            end = start + len(turn_ids) - turn_ids[::-1].index(tokenizer.eos_token_id)
        labels[start:end] = input_ids[start:end]
    return TokenizedExample(input_ids, labels)


def apply_length_policy(
    example: TokenizedExample, max_length: int, truncation: str, where: str
) -> TokenizedExample | None:
    """Enforce `max_length`: raise (error), cut (truncate) or drop (skip, returns None)."""
    if len(example.input_ids) <= max_length:
        return example
    if truncation == "error":
        raise DataError(
            f"{where} has {len(example.input_ids)} tokens, more than data.max_length={max_length}; "
            "raise data.max_length or set data.truncation=truncate (or skip)"
        )
    if truncation == "skip":
        return None
    if truncation == "truncate":
        cut = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])
        return cut if cut.num_target_tokens > 0 else None
    raise DataError(f"data.truncation={truncation!r} is not one of error, truncate, skip")
