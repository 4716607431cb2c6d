"""Tokenising a split through `datasets`: Arrow tables, `Dataset.map` over `data.num_proc` processes, cached once.

A split's rows go into an Arrow table (source, row number, the row as JSON text, so rows of any shape fit one
schema) and `Dataset.map` tokenises them in batches, in `data.num_proc` processes. Every row leaves one output
row: its tokens, or a status saying why it has none ("bad_row": malformed, skipped or raised per
`data.on_bad_row`; "too_long": dropped by the length policy; "fatal": an error no setting skips, such as an
over-long row under `data.truncation=error`) with the message. Workers never raise, so the first error is raised
by the calling process, naming its row, as the serial loop did.

With `data.cache_tokenized`, the tokenised table is saved under `cache_root()/tokenized/<key>` (an Arrow
directory, `Dataset.save_to_disk`), the key hashing everything that changes it (`tokenized_cache_key`): rows,
tokenizer, chat template, length settings. The first process of each node (LOCAL_RANK 0) builds it if missing
and renames it into place; every rank waits at a barrier and reads it (memory-mapped). Skipped rows stay in the
table with their status, so a cached read reports the same skip counts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets

from posttrain.data.cache import cache_root, tokenized_cache_key
from posttrain.data.chat import TokenizedExample, apply_length_policy, tokenize_conversation, validate_messages
from posttrain.data.sources import SourceRow
from posttrain.engine.distributed import barrier
from posttrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class SkipCounts:
    bad_row: int = 0
    too_long: int = 0
    examples: list[str] = field(default_factory=list)  # a few "where: why" lines for the log

    def total(self) -> int:
        return self.bad_row + self.too_long


_TOKENS = datasets.Sequence(datasets.Value("int32"))
_STATUS = {"status": datasets.Value("string"), "message": datasets.Value("string")}
SFT_FEATURES = datasets.Features({"input_ids": _TOKENS, "labels": _TOKENS, **_STATUS})
PREFERENCE_FEATURES = datasets.Features(
    {
        "chosen_input_ids": _TOKENS,
        "chosen_labels": _TOKENS,
        "rejected_input_ids": _TOKENS,
        "rejected_labels": _TOKENS,
        "prompt_length": datasets.Value("int32"),
        **_STATUS,
    }
)


def rows_table(rows: list[SourceRow]) -> datasets.Dataset:
    """The rows as an Arrow table: source, 1-based row number and the row as JSON text."""
    return datasets.Dataset.from_dict(
        {
            "source": [row.source for row in rows],
            "index": [row.index for row in rows],
            "row": [json.dumps(row.row, default=str) for row in rows],
        }
    )


def source_rows(batch: dict) -> list[SourceRow]:
    return [SourceRow(source, index, json.loads(row)) for source, index, row in zip(*batch.values())]


def refuse_blank_assistant_turns(messages: list[dict], where: str) -> None:
    """A DataError for an assistant turn with blank content: trained on, it teaches the model to end its turn at
    once (the preference data refuses blank responses likewise)."""
    for turn, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(
                f"{where}: assistant message {turn} is empty, so the model would learn to answer nothing; "
                "fill it in or drop the row (data.on_bad_row=skip skips such rows)"
            )


def tokenize_sft_row(source_row: SourceRow, tokenizer, max_length: int, truncation: str) -> dict:
    """One SFT row's output: ids and labels, or a status and message (see the module docstring)."""
    where = source_row.where()
    try:
        messages = validate_messages(source_row.row, where)
        refuse_blank_assistant_turns(messages, where)
    except DataError as error:
        return {"input_ids": [], "labels": [], "status": "bad_row", "message": str(error)}
    try:
        example = apply_length_policy(tokenize_conversation(tokenizer, messages, where), max_length, truncation, where)
    except DataError as error:
        return {"input_ids": [], "labels": [], "status": "fatal", "message": str(error)}
    if example is None:
        return {"input_ids": [], "labels": [], "status": "too_long", "message": where}
    return {"input_ids": example.input_ids, "labels": example.labels, "status": "ok", "message": ""}


def tokenize_preference_row(source_row: SourceRow, tokenizer, max_length: int, truncation: str) -> dict:
    """One preference row's output; every DataError of a pair (including the length policy's) is a bad row."""
    from posttrain.data.preference import tokenize_pair

    empty = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": []}
    try:
        pair = tokenize_pair(source_row, tokenizer, max_length, truncation)
    except DataError as error:
        return {**empty, "prompt_length": 0, "status": "bad_row", "message": str(error)}
    if pair is None:
        return {**empty, "prompt_length": 0, "status": "too_long", "message": source_row.where()}
    return {
        "chosen_input_ids": pair.chosen.input_ids,
        "chosen_labels": pair.chosen.labels,
        "rejected_input_ids": pair.rejected.input_ids,
        "rejected_labels": pair.rejected.labels,
        "prompt_length": pair.prompt_length,
        "status": "ok",
        "message": "",
    }


ROW_TOKENIZERS = {"sft": (tokenize_sft_row, SFT_FEATURES), "preference": (tokenize_preference_row, PREFERENCE_FEATURES)}


def _tokenize_batch(batch: dict, kind: str, tokenizer, max_length: int, truncation: str) -> dict:
    tokenize_row = ROW_TOKENIZERS[kind][0]
    outputs = [tokenize_row(row, tokenizer, max_length, truncation) for row in source_rows(batch)]
    return {column: [output[column] for output in outputs] for column in ROW_TOKENIZERS[kind][1]}


def tokenize_table(kind: str, rows: list[SourceRow], tokenizer, data_cfg) -> datasets.Dataset:
    """The tokenised table of `rows` ("sft" or "preference"), one output row per input row, in order."""
    num_proc = max(1, int(getattr(data_cfg, "num_proc", 1)))
    table = rows_table(rows)
    return table.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(rows) > 1 else None,
        fn_kwargs={
            "kind": kind,
            "tokenizer": tokenizer,
            "max_length": int(data_cfg.max_length),
            "truncation": str(data_cfg.truncation),
        },
        remove_columns=table.column_names,
        features=ROW_TOKENIZERS[kind][1],
        load_from_cache_file=False,
        desc=f"tokenising {kind} rows",
    )


def _is_local_main() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def cached_table(key: str, build: Callable[[], datasets.Dataset]) -> tuple[datasets.Dataset, bool]:
    """(table, hit): `cache_root()/tokenized/<key>`, built by the node's first process when missing (staged, then
    renamed into place); every rank meets at a barrier, then reads it."""
    path = cache_root() / "tokenized" / key
    hit = path.exists()
    if not hit and _is_local_main():
        staging = path.with_name(f".tmp-{os.getpid()}-{key}")
        build().save_to_disk(str(staging))
        try:
            os.replace(staging, path)
        except OSError:  # another job put the same table there first
            shutil.rmtree(staging, ignore_errors=True)
    barrier()
    return datasets.load_from_disk(str(path)), hit


def tokenized_split(kind: str, rows: list[SourceRow], tokenizer, data_cfg) -> datasets.Dataset:
    """The tokenised table of `rows`, from the on-disk cache when `data.cache_tokenized` (see the module
    docstring), else built in memory by every process."""
    if data_cfg.on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row={data_cfg.on_bad_row!r} is not one of error, skip")
    build = lambda: tokenize_table(kind, rows, tokenizer, data_cfg)  # noqa: E731
    if not getattr(data_cfg, "cache_tokenized", False):
        return build()
    key = tokenized_cache_key(kind, rows, tokenizer, data_cfg)
    table, hit = cached_table(key, build)
    log.info("tokenised %s data: %s %s", kind, "cache hit" if hit else "cached in", cache_root() / "tokenized" / key)
    return table


def raise_first_error(statuses: list[str], messages: list[str], on_bad_row: str) -> None:
    """Raise the first error a serial loop over the rows would have raised: a fatal row always, a bad row when
    `data.on_bad_row=error`."""
    for status, message in zip(statuses, messages):
        if status == "fatal" or (status == "bad_row" and on_bad_row == "error"):
            raise DataError(message)


def int32_rows(column) -> list[array]:
    """Each row of an Arrow list<int32> column as a compact `array("i")` (4 bytes a token, one copy out of Arrow),
    where `to_pylist` would build a Python int object and a list slot per token (~9x the memory)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = column.offsets.to_numpy()
    offsets = offsets - offsets[0]  # a sliced column's offsets point into the unsliced values; flatten() is sliced
    values = column.flatten().to_numpy(zero_copy_only=False).astype("int32", copy=False)
    rows = []
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        row = array("i")
        row.frombytes(values[start:end].tobytes())
        rows.append(row)
    return rows


def to_examples(table: datasets.Dataset, data_cfg, make: Callable[[dict], object], compact: tuple[str, ...] = ()):
    """(examples, skip counts) of a tokenised table: rows with status "ok" through `make(columns of one row)`.
    Columns named in `compact` (list<int32>) come as `array("i")` rows (`int32_rows`), the others as Python values."""
    columns = {
        name: int32_rows(table.data.column(name)) if name in compact else table.data.column(name).to_pylist()
        for name in table.column_names
    }
    raise_first_error(columns["status"], columns["message"], data_cfg.on_bad_row)
    skipped = SkipCounts()
    examples = []
    for position, status in enumerate(columns["status"]):
        if status == "ok":
            examples.append(make({name: values[position] for name, values in columns.items()}))
        elif status == "too_long":
            skipped.too_long += 1
        else:
            skipped.bad_row += 1
            if len(skipped.examples) < 3:
                skipped.examples.append(columns["message"][position])
    return examples, skipped


def sft_example(columns: dict) -> TokenizedExample:
    return TokenizedExample(columns["input_ids"], columns["labels"])
