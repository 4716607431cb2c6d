"""The SFT dataset: validated, tokenised conversations with assistant-only labels."""

from __future__ import annotations

import logging

from posttrain.data.chat import TokenizedExample
from posttrain.data.sources import SourceRow
from posttrain.data.tokenization import SkipCounts, sft_example, to_examples, tokenized_split
from posttrain.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["SkipCounts", "build_sft_examples"]


def build_sft_examples(
    rows: list[SourceRow], tokenizer, data_cfg, split: str
) -> tuple[list[TokenizedExample], SkipCounts]:
    """Tokenise every row (`posttrain.data.tokenization`: Arrow, `data.num_proc` processes, cached on disk with
    `data.cache_tokenized`); bad rows raise or are skipped and counted per `data.on_bad_row`. The examples hold
    their ids and labels as `array("i")` (4 bytes a token: a million-row mixture stays in memory), which index,
    slice, `len` and extend a list like lists do; compare them to lists with `list(...)`."""
    examples, skipped = to_examples(
        tokenized_split("sft", rows, tokenizer, data_cfg), data_cfg, sft_example, compact=("input_ids", "labels")
    )
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
