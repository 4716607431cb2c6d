"""`Completion`: one sampled response, as every rollout backend returns it."""

from __future__ import annotations

from dataclasses import dataclass

FINISH_REASONS = ("stop", "length")


@dataclass
class Completion:
    """One sample for one prompt.

    token_ids: the generated tokens, including the EOS / stop token that ended the sample (so a trainer
      learns to stop) and the token that completed a stop string.
    text: `token_ids` decoded without special tokens, cut before a matched stop string.
    logprobs: float log-prob of each of `token_ids` (same length), in the backend's `logprobs_mode`
      (see `RolloutConfig.logprobs_mode`).
    finish_reason: "stop" (EOS, a stop token id or a stop string) or "length" (max_tokens or the
      engine's max_model_len reached).
    """

    prompt_index: int
    sample_index: int  # 0 .. n-1 within the prompt
    prompt_token_ids: list[int]  # the ids the engine saw (after the chat template and any truncation)
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


def completion_text(decode, token_ids: list[int], ended_by_token: bool) -> str:
    """`Completion.text` of a sample no stop string ended, as vLLM's incremental detokenizer writes it: `decode`
    (token ids -> text without special tokens) of `token_ids` less the stop token that ended it (EOS or a stop
    token id; kept in token_ids, never in the text), less a trailing incomplete UTF-8 sequence (vLLM holds one back
    until its next token, which a finished sample never gets)."""
    return decode(token_ids[:-1] if ended_by_token else token_ids).rstrip("\ufffd")
