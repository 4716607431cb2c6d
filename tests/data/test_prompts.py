"""RLVR prompt loading: dataset -> verifier mapping (Tülu 3 rows carry no verifier column) and the prompt budget."""

import logging

import pytest
from helpers import compose_config

from posttrain.data.chat import render_ids
from posttrain.data.prompts import (
    TULU3_VERIFIER_MAP,
    PromptRow,
    build_prompt_rows,
    drop_long_prompts,
    filter_prompts_by_length,
)
from posttrain.data.sources import SourceRow
from posttrain.errors import DataError

KNOWN = ["gsm8k", "math", "ifeval", "string_match"]


def rows(*records):
    return [SourceRow("rlvr.jsonl", index, record) for index, record in enumerate(records, start=1)]


def user(text):
    return [{"role": "user", "content": text}]


def test_dataset_column_maps_to_verifiers_by_default():
    prompts = build_prompt_rows(
        rows(
            {"messages": user("a"), "ground_truth": "1", "dataset": "gsm8k"},
            {"messages": user("b"), "ground_truth": "2", "dataset": "MATH"},
            {"messages": user("c"), "ground_truth": "{}", "dataset": "ifeval"},
            {"messages": user("d"), "ground_truth": "4", "dataset": "math"},  # case-insensitive fallback
            {"messages": user("e"), "ground_truth": "5", "dataset": "MATH", "verifier": "string_match"},  # column wins
        ),
        True,
        KNOWN,
        TULU3_VERIFIER_MAP,
    )
    assert [prompt.verifier for prompt in prompts] == ["gsm8k", "math", "ifeval", "math", "string_match"]


def test_unmapped_dataset_names_the_row_and_the_key_to_set():
    with pytest.raises(DataError) as error:
        build_prompt_rows(
            rows(
                {"messages": user("a"), "ground_truth": "1", "dataset": "gsm8k"},
                {"messages": user("b"), "ground_truth": "x", "dataset": "trivia_qa"},
            ),
            True,
            KNOWN,
            TULU3_VERIFIER_MAP,
        )
    message = str(error.value)
    assert "row 2 of rlvr.jsonl" in message and "+data.verifier_map.trivia_qa=<verifier>" in message
    assert "\n" not in message


def test_a_configured_map_replaces_the_default():
    trivia = rows({"messages": user("a"), "ground_truth": "x", "dataset": "trivia_qa"})
    assert build_prompt_rows(trivia, True, [*KNOWN, "f1"], {"trivia_qa": "f1"})[0].verifier == "f1"
    with pytest.raises(DataError, match="unknown verifier 'f1'"):
        build_prompt_rows(trivia, True, KNOWN, {"trivia_qa": "f1"})


def test_row_without_verifier_or_dataset_says_what_is_needed():
    with pytest.raises(DataError, match='row 1 of rlvr.jsonl needs a "verifier".*data.verifier_map'):
        build_prompt_rows(rows({"messages": user("a"), "ground_truth": "1"}), True, KNOWN, TULU3_VERIFIER_MAP)


def test_verifier_map_is_configurable_from_the_command_line():
    cfg = compose_config(["algo=rlvr", "run_dir=x"])
    assert dict(cfg.data.verifier_map) == TULU3_VERIFIER_MAP
    cfg = compose_config(["algo=rlvr", "run_dir=x", "+data.verifier_map.trivia_qa=string_match"])
    assert cfg.data.verifier_map.trivia_qa == "string_match" and cfg.data.verifier_map.MATH == "math"


def test_length_filter_keeps_prompts_within_the_budget(tiny_tokenizer, caplog):
    texts = ["1 + 2", "12 + 34 + 56 + 78 + 90 + 12 + 34", "3 + 4 + 5"]
    prompts = [PromptRow(user(text), "gsm8k", "0", f"row {i}") for i, text in enumerate(texts, start=1)]
    lengths = [len(render_ids(tiny_tokenizer, prompt.prompt, add_generation_prompt=True)) for prompt in prompts]
    assert lengths[0] < lengths[2] < lengths[1]
    budget = lengths[2]  # keeps rows 1 and 3 (length == budget is kept), drops row 2
    kept, dropped = filter_prompts_by_length(prompts, tiny_tokenizer, budget)
    assert [p.where for p in kept] == ["row 1", "row 3"] and [p.where for p in dropped] == ["row 2"]
    with caplog.at_level(logging.WARNING):
        assert drop_long_prompts(prompts, tiny_tokenizer, budget, "train") == kept
    assert "dropped 1 of 3" in caplog.text and "row 2" in caplog.text
    with pytest.raises(DataError, match="raise data.max_length"):
        drop_long_prompts(prompts, tiny_tokenizer, lengths[0] - 1, "train")
