"""Tokenisation through `datasets`: the same examples as the serial loop (num_proc 1 and 2, cached or not), one
Arrow cache per key, built by the node's first process and read by the others, no pickle."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

import posttrain.data.tokenization as tokenization
from posttrain.config import DataConfig
from posttrain.data.chat import apply_length_policy, tokenize_conversation, validate_messages
from posttrain.data.preference import build_preference_examples, tokenize_pair
from posttrain.data.sft import build_sft_examples
from posttrain.data.sources import SourceRow, read_file
from posttrain.errors import DataError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tulu3"


@pytest.fixture()
def sft_rows(arithmetic_rows):
    """The Tülu fixture rows, 40 arithmetic ones, a malformed row and an over-long one."""
    rows = read_file(FIXTURES / "sft.jsonl")
    rows += [SourceRow("arithmetic", i, row) for i, row in enumerate(arithmetic_rows[:40], start=1)]
    rows.append(SourceRow("bad.jsonl", 1, {"messages": [{"role": "user", "content": "no reply"}]}))
    rows.append(SourceRow("long.jsonl", 1, {"messages": [{"role": "user", "content": "1 + 1 = ?"},
                                                         {"role": "assistant", "content": "2 " * 1000}]}))  # fmt: skip
    return rows


def serial_sft(rows, tokenizer, max_length, truncation):
    """The serial loop tokenisation used to run (the chat.py building blocks, row by row), skipping bad rows:
    (examples, bad rows, over-long rows)."""
    examples, bad, too_long = [], 0, 0
    for row in rows:
        try:
            messages = validate_messages(row.row, row.where())
        except DataError:
            bad += 1
            continue
        conversation = tokenize_conversation(tokenizer, messages, row.where())
        example = apply_length_policy(conversation, max_length, truncation, row.where())
        if example is None:
            too_long += 1
        else:
            examples.append((example.input_ids, example.labels))
    return examples, bad, too_long


def as_lists(examples):
    return [(list(example.input_ids), list(example.labels)) for example in examples]


def test_int32_rows_equal_to_pylist_on_sliced_and_chunked_columns():
    import pyarrow as pa

    rows = [[1, 2, 3], [], [-100, 7], None, [2**31 - 1, -(2**31)], [5]]
    column = pa.chunked_array([pa.array(rows[:3], pa.list_(pa.int32())), pa.array(rows[3:], pa.list_(pa.int32()))])
    for piece in (column, column.slice(1, 4), column.combine_chunks().slice(2, 3)):
        got = tokenization.int32_rows(piece)
        assert [list(row) for row in got] == [row or [] for row in piece.to_pylist()]
        assert all(row.typecode == "i" and row.itemsize == 4 for row in got)


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("truncation", ["skip", "truncate"])
def test_sft_examples_match_the_serial_loop(sft_rows, tiny_tokenizer, num_proc, truncation):
    data_cfg = DataConfig(max_length=128, truncation=truncation, on_bad_row="skip", num_proc=num_proc)
    examples, skipped = build_sft_examples(sft_rows, tiny_tokenizer, data_cfg, "train")
    expected, bad, too_long = serial_sft(sft_rows, tiny_tokenizer, 128, truncation)
    assert as_lists(examples) == expected and len(expected) > 40
    assert (skipped.bad_row, skipped.too_long) == (bad, too_long) == (1, too_long) and (too_long > 0) == (
        truncation == "skip"
    )
    assert all(type(token) is int for token in examples[0].input_ids)


def test_preference_pairs_match_the_serial_loop(tiny_tokenizer):
    rows = read_file(FIXTURES / "preference.jsonl")
    pairs, skipped = build_preference_examples(rows, tiny_tokenizer, DataConfig(max_length=256, num_proc=2), "train")
    expected = [tokenize_pair(row, tiny_tokenizer, 256, "error") for row in rows]
    assert skipped.total() == 0 and len(pairs) == len(rows) == 4
    for pair, reference in zip(pairs, expected):
        assert as_lists([pair.chosen, pair.rejected]) == as_lists([reference.chosen, reference.rejected])
        assert pair.prompt_length == reference.prompt_length


def test_first_error_is_raised_in_row_order(sft_rows, tiny_tokenizer):
    with pytest.raises(DataError, match="row 1 of bad.jsonl"):
        build_sft_examples(sft_rows, tiny_tokenizer, DataConfig(max_length=512, num_proc=2), "train")
    # truncation=error is not skippable: the over-long row stops the run even with on_bad_row=skip
    with pytest.raises(DataError, match="row 1 of long.jsonl has .* tokens"):
        build_sft_examples(sft_rows, tiny_tokenizer, DataConfig(max_length=512, on_bad_row="skip"), "train")


def test_cache_is_one_arrow_table_per_key_and_reads_back_the_same(tmp_path, monkeypatch, sft_rows, tiny_tokenizer):
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tmp_path))
    builds = []
    real = tokenization.tokenize_table
    monkeypatch.setattr(tokenization, "tokenize_table", lambda *args: builds.append(1) or real(*args))
    data_cfg = DataConfig(cache_tokenized=True, max_length=128, truncation="skip", on_bad_row="skip")

    first, first_skipped = build_sft_examples(sft_rows, tiny_tokenizer, data_cfg, "train")
    again, again_skipped = build_sft_examples(sft_rows, tiny_tokenizer, data_cfg, "train")
    assert len(builds) == 1 and as_lists(again) == as_lists(first) and again_skipped == first_skipped
    uncached, _ = build_sft_examples(sft_rows, tiny_tokenizer, DataConfig(max_length=128, truncation="skip",
                                                                          on_bad_row="skip"), "train")  # fmt: skip
    assert len(builds) == 2 and as_lists(uncached) == as_lists(first)
    entries = list((tmp_path / "tokenized").iterdir())
    assert len(entries) == 1 and (entries[0] / "dataset_info.json").exists()
    assert not [path for path in tmp_path.rglob("*") if path.suffix in (".pkl", ".pickle")]

    build_sft_examples(sft_rows[:-1], tiny_tokenizer, data_cfg, "train")  # other rows: a new key
    build_sft_examples(sft_rows, tiny_tokenizer, replace(data_cfg, max_length=64), "train")
    assert len(builds) == 4 and len(list((tmp_path / "tokenized").iterdir())) == 3
    with pytest.raises(DataError, match="row 1 of bad.jsonl"):  # on_bad_row=error reads the same table and raises
        build_sft_examples(sft_rows, tiny_tokenizer, replace(data_cfg, on_bad_row="error"), "train")
    assert len(builds) == 4


def test_only_the_first_process_of_a_node_builds(tmp_path, monkeypatch, tiny_tokenizer):
    """LOCAL_RANK 1 must not build: it meets LOCAL_RANK 0 at the barrier (simulated here by building as rank 0
    there) and reads the table rank 0 wrote."""
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tmp_path))
    rows = read_file(FIXTURES / "preference.jsonl")
    data_cfg = DataConfig(cache_tokenized=True, max_length=256)
    builders = []
    real = tokenization.tokenize_table

    def tokenize_table(*args):
        builders.append(tokenization.os.environ["LOCAL_RANK"])
        return real(*args)

    def barrier():  # rank 1 waits here; rank 0 arrives meanwhile, having built the table
        if tokenization.os.environ["LOCAL_RANK"] == "1":
            monkeypatch.setenv("LOCAL_RANK", "0")
            build_preference_examples(rows, tiny_tokenizer, data_cfg, "train")
            monkeypatch.setenv("LOCAL_RANK", "1")

    monkeypatch.setattr(tokenization, "tokenize_table", tokenize_table)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tokenization, "barrier", barrier)
    pairs, _ = build_preference_examples(rows, tiny_tokenizer, data_cfg, "train")
    assert builders == ["0"] and len(pairs) == 4
    assert json.loads((next((tmp_path / "tokenized").iterdir()) / "state.json").read_text())["_data_files"]
