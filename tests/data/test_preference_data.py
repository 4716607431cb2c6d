"""Preference pairs: both row formats, response-only labels, bad rows, pair collation, the generators."""

import json

import pytest
import torch

from posttrain.config import DataConfig
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample, render_ids
from posttrain.data.preference import (
    PreferenceExample,
    build_preference_examples,
    collate_pairs,
    first_divergent_step,
    separator_tokens,
)
from posttrain.data.sources import SourceRow, read_file
from posttrain.errors import DataError
from posttrain.models.logprobs import sequence_logprob_sums

PROMPT = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 2 + 3?"}]
CHOSEN = [{"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]
REJECTED = [{"role": "assistant", "content": "2 + 3 = 6\n#### 6"}]


def rows(*items, source="prefs.jsonl"):
    return [SourceRow(source, i, row) for i, row in enumerate(items, start=1)]


def build(items, tokenizer, **data):
    return build_preference_examples(rows(*items), tokenizer, DataConfig(**{"max_length": 128, **data}), "train")


def test_explicit_prompt_and_full_conversation_formats_give_the_same_pair(tiny_tokenizer):
    explicit = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    conversation = {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED}
    strings = {"prompt": "What is 2 + 3?", "chosen": CHOSEN[0]["content"], "rejected": REJECTED[0]["content"]}
    (a, b), _ = build([explicit, conversation], tiny_tokenizer)
    assert (a.chosen, a.rejected, a.prompt_length) == (b.chosen, b.rejected, b.prompt_length)
    (c,), _ = build([strings], tiny_tokenizer)
    assert c.prompt_length == len(render_ids(tiny_tokenizer, [PROMPT[1]], add_generation_prompt=True))


def test_only_response_tokens_are_labelled_and_the_prompt_is_shared(tiny_tokenizer):
    (pair,), _ = build([{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], tiny_tokenizer)
    prompt_ids = render_ids(tiny_tokenizer, PROMPT, add_generation_prompt=True)
    for sequence, response in ((pair.chosen, CHOSEN), (pair.rejected, REJECTED)):
        assert sequence.input_ids[: len(prompt_ids)] == prompt_ids
        assert all(label == IGNORE_INDEX for label in sequence.labels[: len(prompt_ids)])
        labelled = sequence.input_ids[len(prompt_ids) :]
        assert sequence.labels[len(prompt_ids) :] == labelled  # every response token, nothing after it
        assert labelled[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(labelled[:-1]) == response[0]["content"]


def test_an_earlier_assistant_turn_in_the_prompt_is_not_trained_on(tiny_tokenizer):
    history = [
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2 + 3?"},
    ]
    (pair,), _ = build([{"prompt": history, "chosen": CHOSEN, "rejected": REJECTED}], tiny_tokenizer)
    assert pair.chosen.num_target_tokens == len(
        tiny_tokenizer(CHOSEN[0]["content"] + "<|end|>", add_special_tokens=False)["input_ids"]
    )


BAD_ROWS = {
    "identical": (
        {"prompt": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN},
        "row 2 of prefs.jsonl: chosen and rejected responses are identical",
    ),
    "missing_rejected": ({"prompt": PROMPT, "chosen": CHOSEN}, 'row 2 of prefs.jsonl has no "rejected" field'),
    "empty_response": (
        {"prompt": PROMPT, "chosen": CHOSEN, "rejected": [{"role": "assistant", "content": "  "}]},
        "row 2 of prefs.jsonl: the rejected response is empty",
    ),
    "no_response": (
        {"chosen": PROMPT + CHOSEN, "rejected": PROMPT},
        "row 2 of prefs.jsonl: the rejected response is empty",
    ),
    "no_prompt": ({"chosen": CHOSEN, "rejected": REJECTED}, "row 2 of prefs.jsonl: the pair has no prompt"),
    "bad_role": (
        {"prompt": PROMPT, "chosen": [{"role": "bot", "content": "x"}], "rejected": REJECTED},
        "row 2 of prefs.jsonl: message 0 has unknown role 'bot'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_raise_naming_file_and_row_or_are_skipped_and_counted(case, tiny_tokenizer):
    good = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    bad, message = BAD_ROWS[case]
    with pytest.raises(DataError) as error:
        build([good, bad], tiny_tokenizer)
    assert message in str(error.value)
    examples, skipped = build([good, bad, good], tiny_tokenizer, on_bad_row="skip")
    assert len(examples) == 2 and skipped.bad_row == 1


def test_over_long_pairs_follow_the_truncation_policy(tiny_tokenizer):
    long = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "5 " * 80}], "rejected": REJECTED}
    with pytest.raises(DataError, match="row 1 of prefs.jsonl has .* tokens .* data.max_length=64"):
        build([long], tiny_tokenizer, max_length=64)
    good = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    examples, skipped = build([long, good], tiny_tokenizer, max_length=64, truncation="skip")
    assert len(examples) == 1 and skipped.too_long == 1
    (cut, _), _ = build([long, good], tiny_tokenizer, max_length=64, truncation="truncate")
    assert len(cut.chosen.input_ids) == 64 and cut.chosen.num_target_tokens > 0


def test_jsonl_rows_carry_their_file_and_line_into_errors(tmp_path, tiny_tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED})
        + "\n"
        + json.dumps({"chosen": CHOSEN})
        + "\n"
    )
    with pytest.raises(DataError, match=f'row 2 of {path} has no "rejected" field'):
        build_preference_examples(read_file(path), tiny_tokenizer, DataConfig(), "train")


def test_packed_and_padded_pair_batches_give_the_same_sequence_sums(tiny_tokenizer, tiny_model):
    from data_recipes import generate_task
    from posttrain.models.logprob_model import CausalLMWithLogprobs
    from posttrain.models.logprobs import pair_logprob_sums

    pairs, _ = build(generate_task("arithmetic_preference", "train", 6, seed=0), tiny_tokenizer)
    model = CausalLMWithLogprobs(tiny_model, fused=False).eval()
    with torch.no_grad():
        packed = pair_logprob_sums(model, collate_pairs(pairs, True, tiny_tokenizer.pad_token_id))
        padded = pair_logprob_sums(model, collate_pairs(pairs, False, tiny_tokenizer.pad_token_id))
        # One sequence at a time, summed by hand over its labelled tokens.
        for i, pair in enumerate(pairs):
            for sums, sequence in ((packed[0], pair.chosen), (packed[1], pair.rejected)):
                ids = torch.tensor([sequence.input_ids])
                targets = torch.tensor([sequence.labels[1:] + [IGNORE_INDEX]])
                logprobs, _ = model(ids, targets)
                torch.testing.assert_close(sums[i], logprobs.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-5, atol=1e-5)


def test_collate_pairs_indexes_last_and_prompt_tokens(tiny_tokenizer):
    (pair,), _ = build([{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], tiny_tokenizer)
    for packing in (True, False):
        batch = collate_pairs([pair, pair], packing, tiny_tokenizer.pad_token_id)
        flat = batch.inputs["input_ids"].reshape(-1)
        assert flat[batch.last_index].tolist() == [tiny_tokenizer.eos_token_id] * 4
        assert (
            flat[batch.prompt_index + 1].tolist()
            == [pair.chosen.input_ids[pair.prompt_length]] * 2 + [pair.rejected.input_ids[pair.prompt_length]] * 2
        )
        assert (
            batch.response_lengths.tolist()
            == [pair.chosen.num_target_tokens] * 2 + [pair.rejected.num_target_tokens] * 2
        )


def test_sequence_logprob_sums_adds_only_target_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0]])
    targets = torch.tensor([[IGNORE_INDEX, 7, 7, IGNORE_INDEX, 7]])
    segments = torch.tensor([[0, 0, 1, 1, 1]])
    assert sequence_logprob_sums(logprobs, targets, segments, 2).tolist() == [-2.0, -8.0]


def test_arithmetic_preference_is_deterministic_disjoint_and_always_wrong():
    from data_recipes import generate_task

    for kwargs in ({}, {"operations": "+", "steps": True}):
        train = generate_task("arithmetic_preference", "train", 300, seed=3, **kwargs)
        assert train == generate_task("arithmetic_preference", "train", 300, seed=3, **kwargs)
        held_out = generate_task("arithmetic_preference", "eval", 60, seed=3, **kwargs)
        assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held_out}
        for row in train + held_out:
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert chosen.endswith(f"#### {row['ground_truth']}") and chosen != rejected
            assert not rejected.endswith(f"#### {row['ground_truth']}") or row["mistake"] != "transcription"
        assert {row["mistake"] for row in train} == {"off_by_one", "carry", "misread", "transcription"}


def test_cyclic_preference_pairs_form_cycles_on_disjoint_prompts():
    from data_recipes import generate_task
    from data_recipes.preference import CYCLIC_GAMES

    train = generate_task("cyclic_preference", "train", 300, seed=0)
    held_out = generate_task("cyclic_preference", "eval", 90, seed=0)
    assert len(train) == 300 and len(held_out) == 90
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held_out}
    for start in range(0, len(train), 3):
        group = train[start : start + 3]
        moves = CYCLIC_GAMES[group[0]["subset"]]
        beats = {
            (
                next(m for m in moves if m in r["chosen"][0]["content"]),
                next(m for m in moves if m in r["rejected"][0]["content"]),
            )
            for r in group
        }
        assert beats == {(moves[0], moves[1]), (moves[1], moves[2]), (moves[2], moves[0])}  # A > B > C > A


def _pair(prompt, chosen, rejected):
    def sequence(response):
        return TokenizedExample(prompt + response, [IGNORE_INDEX] * len(prompt) + response)

    return PreferenceExample(sequence(chosen), sequence(rejected), len(prompt))


@pytest.mark.parametrize(
    "chosen, rejected, chosen_kept, rejected_kept, context",
    [
        # the second line differs: the shared first line is context, the third line is dropped
        ([5, 6, 10, 7, 8, 10, 9, 11], [5, 6, 10, 7, 3, 10, 4, 11], [7, 8, 10], [7, 3, 10], [5, 6, 10]),
        # the first line differs: no shared step, nothing labelled before it
        ([5, 6, 10, 9, 11], [5, 2, 10, 9, 11], [5, 6, 10], [5, 2, 10], []),
        # the last line differs: its step runs to the end of the response (the end-of-turn token)
        ([5, 10, 9, 11], [5, 10, 4, 4, 11], [9, 11], [4, 4, 11], [5, 10]),
    ],
)
def test_first_divergent_step_keeps_only_the_first_differing_step(
    chosen, rejected, chosen_kept, rejected_kept, context
):
    prompt = [1, 2]
    cut = first_divergent_step(_pair(prompt, chosen, rejected), frozenset({10}))
    for sequence, kept in ((cut.chosen, chosen_kept), (cut.rejected, rejected_kept)):
        assert sequence.input_ids == prompt + context + kept
        assert sequence.labels == [IGNORE_INDEX] * (len(prompt) + len(context)) + kept
    assert cut.prompt_length == len(prompt)


def test_first_divergent_step_on_a_rendered_arithmetic_pair(tiny_tokenizer):
    chosen = [{"role": "assistant", "content": "2 + 8 + 0 = 10\n9 + 7 + 1 = 17\n#### 170"}]
    rejected = [{"role": "assistant", "content": "2 + 8 + 0 = 10\n9 + 7 + 0 = 16\n#### 160"}]
    (pair,), _ = build([{"prompt": PROMPT, "chosen": chosen, "rejected": rejected}], tiny_tokenizer)
    separators = separator_tokens(tiny_tokenizer, "\\n")  # as a shell passes algo.step_separator="\n"
    assert separators == separator_tokens(tiny_tokenizer, "\n")
    cut = first_divergent_step(pair, separators)
    prompt_ids = render_ids(tiny_tokenizer, PROMPT, add_generation_prompt=True)
    for sequence, step in ((cut.chosen, "9 + 7 + 1 = 17\n"), (cut.rejected, "9 + 7 + 0 = 16\n")):
        assert tiny_tokenizer.decode(sequence.input_ids[len(prompt_ids) :]) == "2 + 8 + 0 = 10\n" + step
        assert tiny_tokenizer.decode([label for label in sequence.labels if label != IGNORE_INDEX]) == step


def test_a_step_separator_no_token_contains_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(DataError, match="no token of the tokenizer contains the step separator"):
        separator_tokens(tiny_tokenizer, "\u2603")
