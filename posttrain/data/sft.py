"""The SFT dataset: validated, tokenised conversations with assistant-only labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from posttrain.data.chat import TokenizedExample, apply_length_policy, tokenize_conversation, validate_messages
from posttrain.data.sources import SourceRow
from posttrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class SkipCounts:
    bad_row: int = 0
    too_long: int = 0
    examples: list[str] = field(default_factory=list)  # a few "where: why" lines for the log

    def total(self) -> int:
        return self.bad_row + self.too_long


def build_sft_examples(
    rows: list[SourceRow], tokenizer, data_cfg, split: str
) -> tuple[list[TokenizedExample], SkipCounts]:
    """Tokenise every row; bad rows raise or are skipped and counted per `data.on_bad_row`.

    With `data.cache_tokenized`, the result comes from (or goes to) the on-disk cache keyed by a hash of
    the rows, tokenizer and length settings (`posttrain.data.cache`).
    """
    if getattr(data_cfg, "cache_tokenized", False):
        from posttrain.data.cache import cached_tokenization

        return cached_tokenization(
            "sft", rows, tokenizer, data_cfg, lambda: tokenize_sft_rows(rows, tokenizer, data_cfg, split)
        )
    return tokenize_sft_rows(rows, tokenizer, data_cfg, split)


def refuse_blank_assistant_turns(messages: list[dict], where: str) -> None:
    """A DataError for an assistant turn with blank content: trained on, it teaches the model to end its turn at
    once (the preference data refuses blank responses likewise)."""
    for turn, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(
                f"{where}: assistant message {turn} is empty, so the model would learn to answer nothing; "
                "fill it in or drop the row (data.on_bad_row=skip skips such rows)"
            )


def tokenize_sft_rows(
    rows: list[SourceRow], tokenizer, data_cfg, split: str
) -> tuple[list[TokenizedExample], SkipCounts]:
    if data_cfg.on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row={data_cfg.on_bad_row!r} is not one of error, skip")
    examples, skipped = [], SkipCounts()
    for source_row in rows:
        where = source_row.where()
        try:
            messages = validate_messages(source_row.row, where)
            refuse_blank_assistant_turns(messages, where)
        except DataError as error:
            if data_cfg.on_bad_row == "error":
                raise
            skipped.bad_row += 1
            if len(skipped.examples) < 3:
                skipped.examples.append(str(error))
            continue
        example = apply_length_policy(
            tokenize_conversation(tokenizer, messages, where), data_cfg.max_length, data_cfg.truncation, where
        )
        if example is None:
            skipped.too_long += 1
            continue
        examples.append(example)
    if skipped.total():
        log.warning(
            "%s data: skipped %d bad rows and %d over-long rows (e.g. %s)",
            split,
            skipped.bad_row,
            skipped.too_long,
            "; ".join(skipped.examples),
        )
    if not examples and rows:
        raise DataError(
            f"the {split} data has {len(rows)} rows but none is usable (all were skipped); see the warnings above"
        )
    if not examples:
        raise DataError(f"the {split} data is empty")
    return examples, skipped
