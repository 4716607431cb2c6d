"""Prompt datasets for sampling trainers (RLVR, GPO): chat prompts with a verifier and ground truth.

A prompt row names its verifier in a "verifier" column, or (the Tülu 3 RLVR format, e.g.
allenai/RLVR-GSM-MATH-IF-Mixed-Constraints) in a "dataset" column that `data.verifier_map` turns into a
verifier name: {"gsm8k": "gsm8k", "MATH": "math", "ifeval": "ifeval"} by default, as open-instruct does.
Prompts longer than the prompt budget are dropped and counted at load (`filter_prompts_by_length`), so no
over-long prompt reaches the rollout engine mid-run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from posttrain.data.chat import render_ids, validate_messages
from posttrain.data.sources import SourceRow
from posttrain.errors import DataError

log = logging.getLogger(__name__)

# Tülu 3's RLVR mixture: its "dataset" column -> posttrain verifier (open-instruct looks up dataset.lower()).
TULU3_VERIFIER_MAP = {"gsm8k": "gsm8k", "MATH": "math", "ifeval": "ifeval"}
DATASET_COLUMN = "dataset"


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


def mapped_verifier(row: dict, where: str, verifier_map: Mapping[str, str] | None) -> str | None:
    """The row's "verifier", else its "dataset" looked up in `verifier_map` (exact key, then case-insensitive);
    None when the row has neither column. A dataset the map does not name raises DataError naming the key to set."""
    if row.get("verifier") is not None:
        return row["verifier"]
    dataset = row.get(DATASET_COLUMN)
    if dataset is None or verifier_map is None:
        return None
    if dataset in verifier_map:
        return verifier_map[dataset]
    folded = {str(key).lower(): value for key, value in verifier_map.items()}
    if str(dataset).lower() in folded:
        return folded[str(dataset).lower()]
    raise DataError(
        f"{where} has dataset {dataset!r}, which data.verifier_map does not map to a verifier; add "
        f"+data.verifier_map.{dataset}=<verifier> (mapped now: {', '.join(map(str, verifier_map)) or 'nothing'})"
    )


def build_prompt_rows(
    rows: list[SourceRow],
    need_verifier: bool,
    known_verifiers: list[str] | None = None,
    verifier_map: Mapping[str, str] | None = None,
) -> list[PromptRow]:
    """Validated prompt rows; with `need_verifier`, each must name a known verifier (a "verifier" column, or a
    "dataset" column mapped by `verifier_map`) and a "ground_truth"."""
    prompts = []
    for source_row in rows:
        where = source_row.where()
        row = source_row.row
        messages = prompt_messages(row, where)
        verifier = mapped_verifier(row, where, verifier_map) if need_verifier else row.get("verifier")
        ground_truth = row.get("ground_truth")
        if need_verifier:
            if verifier is None or ground_truth is None:
                raise DataError(
                    f'{where} needs a "verifier" (e.g. "gsm8k") or a "{DATASET_COLUMN}" named in data.verifier_map, '
                    'and a "ground_truth" field, for RLVR'
                )
            if known_verifiers is not None and verifier not in known_verifiers:
                raise DataError(f"{where} names unknown verifier {verifier!r}; known: {', '.join(known_verifiers)}")
        prompts.append(PromptRow(messages, verifier, ground_truth, where))
    if not prompts:
        raise DataError("the prompt dataset is empty")
    return prompts


def prompt_token_count(tokenizer, messages: list[dict]) -> int:
    """Tokens of `messages` rendered with the chat template and the generation prompt (what the engine receives)."""
    return len(render_ids(tokenizer, messages, add_generation_prompt=True))


def filter_prompts_by_length(
    prompts: list[PromptRow], tokenizer, max_prompt_tokens: int
) -> tuple[list[PromptRow], list[PromptRow]]:
    """(kept, dropped): prompts whose rendered length (`prompt_token_count`) is at most / above
    `max_prompt_tokens`. The caller logs the dropped count; an empty `kept` is the caller's error to raise."""
    kept, dropped = [], []
    for prompt in prompts:
        (kept if prompt_token_count(tokenizer, prompt.prompt) <= max_prompt_tokens else dropped).append(prompt)
    return kept, dropped


def drop_long_prompts(prompts: list[PromptRow], tokenizer, max_prompt_tokens: int, split: str) -> list[PromptRow]:
    """`prompts` without those longer than `max_prompt_tokens` (RLVR: `data.max_length`), the dropped ones
    counted in the log; DataError when none is left."""
    kept, dropped = filter_prompts_by_length(prompts, tokenizer, max_prompt_tokens)
    if dropped:
        log.warning(
            "%s prompts: dropped %d of %d longer than %d tokens (data.max_length), e.g. %s",
            split, len(dropped), len(prompts), max_prompt_tokens, dropped[0].where,
        )  # fmt: skip
    if not kept:
        raise DataError(
            f"all {len(prompts)} {split} prompts are longer than data.max_length={max_prompt_tokens} tokens; "
            "raise data.max_length"
        )
    return kept


def unique_prompt_rows(rows: list[SourceRow]) -> list[PromptRow]:
    """Prompt rows without verifiers, repeated prompts dropped (preference data repeats a prompt per pair)."""
    seen, prompts = set(), []
    for prompt in build_prompt_rows(rows, need_verifier=False):
        key = json.dumps(prompt.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return prompts
