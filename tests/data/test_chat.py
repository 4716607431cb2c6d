"""Chat templating, assistant-only masks, validation errors and the length policy."""

import pytest

from posttrain.data.chat import IGNORE_INDEX, apply_length_policy, tokenize_conversation, validate_messages
from posttrain.errors import DataError

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 1 + 2?"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "And 2 + 2?"},
    {"role": "assistant", "content": "4"},
]


def test_only_assistant_turns_are_labelled_multi_turn(tiny_tokenizer):
    example = tokenize_conversation(tiny_tokenizer, MULTI_TURN)
    labelled = tiny_tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    )
    # Each assistant reply and its end-of-turn token are targets; nothing from system / user turns.
    assert labelled == "3<|end|>4<|end|>"  # the newline after each <|end|> is template, not target
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(example.input_ids, example.labels))


def test_masks_agree_with_the_templates_generation_markers(tiny_tokenizer):
    """Independent reference: transformers' assistant mask from the template's {% generation %} tags."""
    rendered = tiny_tokenizer.apply_chat_template(
        MULTI_TURN, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    example = tokenize_conversation(tiny_tokenizer, MULTI_TURN)
    assert example.input_ids == rendered["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in example.labels] == rendered["assistant_masks"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "hi"}, 'row 3 of train.jsonl has no "messages" field'),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, 'must be an object with "role" and "content"'),
        (
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
            "content must be a string",
        ),
    ],
)
def test_bad_rows_name_the_row_and_the_fix(row, message):
    with pytest.raises(DataError, match=message):
        validate_messages(row, "row 3 of train.jsonl")


def test_length_policy(tiny_tokenizer):
    example = tokenize_conversation(tiny_tokenizer, MULTI_TURN)
    n = len(example.input_ids)
    assert apply_length_policy(example, n, "error", "row 1") is example
    with pytest.raises(DataError, match=rf"row 1 of x.jsonl has {n} tokens, more than data.max_length={n - 1}"):
        apply_length_policy(example, n - 1, "error", "row 1 of x.jsonl")
    assert apply_length_policy(example, n - 1, "skip", "row 1") is None
    cut = apply_length_policy(example, n - 1, "truncate", "row 1")
    assert len(cut.input_ids) == n - 1 and cut.labels == example.labels[: n - 1]
    # Truncated before the first assistant token: nothing left to train on, so it is dropped.
    first_target = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert apply_length_policy(example, first_target, "truncate", "row 1") is None
