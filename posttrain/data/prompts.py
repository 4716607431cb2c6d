"""Prompt datasets for sampling trainers (RLVR, GPO): chat prompts with a verifier and ground truth."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from posttrain.data.chat import validate_messages
from posttrain.data.sources import SourceRow
from posttrain.errors import DataError


@dataclass
class PromptRow:
    prompt: list[dict]  # chat messages ending before the reply to sample
    verifier: str | None
    ground_truth: Any
    where: str


def prompt_messages(row: dict, where: str) -> list[dict]:
    """The row's "prompt" messages, or its "messages" without the final assistant reply."""
    if isinstance(row, dict) and "prompt" in row:
        return validate_messages(row, where, field="prompt", need_assistant=False)
    messages = validate_messages(row, where, field="messages", need_assistant=False)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(f'{where}: "messages" has no turn before the assistant reply to use as a prompt')
    return messages


def build_prompt_rows(
    rows: list[SourceRow], need_verifier: bool, known_verifiers: list[str] | None = None
) -> list[PromptRow]:
    """Validated prompt rows; with `need_verifier`, each must name a known "verifier" and a "ground_truth"."""
    prompts = []
    for source_row in rows:
        where = source_row.where()
        row = source_row.row
        messages = prompt_messages(row, where)
        verifier, ground_truth = row.get("verifier"), row.get("ground_truth")
        if need_verifier:
            if verifier is None or ground_truth is None:
                raise DataError(f'{where} needs "verifier" (e.g. "gsm8k") and "ground_truth" fields for RLVR')
            if known_verifiers is not None and verifier not in known_verifiers:
                raise DataError(f"{where} names unknown verifier {verifier!r}; known: {', '.join(known_verifiers)}")
        prompts.append(PromptRow(messages, verifier, ground_truth, where))
    if not prompts:
        raise DataError("the prompt dataset is empty")
    return prompts


def unique_prompt_rows(rows: list[SourceRow]) -> list[PromptRow]:
    """Prompt rows without verifiers, repeated prompts dropped (preference data repeats a prompt per pair)."""
    seen, prompts = set(), []
    for prompt in build_prompt_rows(rows, need_verifier=False):
        key = json.dumps(prompt.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return prompts
