"""IFEval verifier: every instruction type satisfied and violated, ground-truth formats, nasty text."""

import json
import time

import pytest

from posttrain.errors import DataError
from posttrain.rewards import get_verifier
from posttrain.rewards.ifeval import INSTRUCTION_CHECKS, count_sentences, parse_instructions, score_ifeval

# (instruction id, kwargs, a response that satisfies it, one that violates it)
CASES = [
    ("keywords:existence", {"keywords": ["banana", "Split"]}, "A BANANA split.", "A banana."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "Cat and cat.", "One cat."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "One cat.", "cat cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "evil"]}, "A badge is fine.", "That is Evil."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}, "Zzz!", "zz"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "less than"}, "zz", "ZZZ"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two three", "one two"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "one two", "one, two, three"),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
        "Dr. Smith met J. K. Rowling at 3.30, e.g. by chance",
        "One. Two! Three?",
    ),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "Yes. No! Why?", "Yes. No!"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "First.\n\nSecond."),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        'Intro here.\n\n"However, the end.',
        "Intro here.\n\nBut the end.",
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\np. s. see you", "Bye. PS see you"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Bye.\nP.P.S. more", "Bye.\nP.S. only"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two\ntext", "* one\n**bold**\n"),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "Maybe."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**", "*a* and ** **"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nintro\nSection 2\nbody",
        "Section 1\nonly",
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', '{"a": 1,}'),
    ("detectable_format:title", {}, "<<Poem of Joy>>\nLa la.", "<< >> and <<no\nclose>>"),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Same.\n******\nSame."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, " write a POEM. Roses...", "Roses..."),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        'Done. Any other questions?"',
        "Any other questions? Bye.",
    ),
    ("startend:quotation", {}, ' "Hello there." ', '"Hello there.'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}, "AN X", "An X"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"}, "An X", "AN X"),
    ("change_case:english_capital", {}, "ALL CAPS, 123!", "ALL CAPS but one"),
    ("change_case:english_lowercase", {}, "all lower, 123!", "all lower but One"),
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
    ("language:response_language", {"language": "es"}, "Hola amigo, ¿cómo estás hoy?", "Hello friend, how are you?"),
]


def _ground_truth(instruction_id, kwargs):
    return {"instruction_id_list": [instruction_id], "kwargs": [kwargs]}


@pytest.mark.parametrize("instruction_id,kwargs,satisfying,violating", CASES)
def test_each_instruction_satisfied_and_violated(instruction_id, kwargs, satisfying, violating):
    assert score_ifeval(satisfying, _ground_truth(instruction_id, kwargs)) == 1.0
    assert score_ifeval(violating, _ground_truth(instruction_id, kwargs)) == 0.0


def test_every_supported_instruction_has_a_case():
    assert {case[0] for case in CASES} == set(INSTRUCTION_CHECKS)
    assert len(INSTRUCTION_CHECKS) >= 15


def test_published_ifeval_row_with_huggingface_null_kwargs():
    """IFEval row 1000 (Zhou et al. 2023), as stored on the HuggingFace hub: every kwargs key, mostly null."""
    prompt = (
        "Write a 300+ word summary of the wikipedia page "
        '"https://en.wikipedia.org/wiki/Raymond_III,_Count_of_Tripoli". '
        "Do not use any commas and highlight at least 3 sections that has titles in markdown format, for example "
        "*highlighted section part 1*, *highlighted section part 2*, *highlighted section part 3*."
    )
    null_kwargs = dict.fromkeys(["num_highlights", "relation", "num_words", "keywords", "prompt_to_repeat"])
    row = {
        "key": 1000,
        "prompt": prompt,
        "instruction_id_list": [
            "punctuation:no_comma",
            "detectable_format:number_highlighted_sections",
            "length_constraints:number_words",
        ],
        "kwargs": [
            null_kwargs,
            {**null_kwargs, "num_highlights": 3},
            {**null_kwargs, "relation": "at least", "num_words": 300},
        ],
    }
    body = " ".join(["Raymond III was Count of Tripoli and a regent of Jerusalem."] * 30)
    follows_all = f"*Early life*\n{body}\n*Regency*\n{body}\n*Hattin*\nHe died in 1187."
    assert score_ifeval(follows_all, row) == 1.0
    assert score_ifeval(json.dumps(row), row) == 1.0 / 3  # JSON has commas and no highlights, but 300+ words
    assert score_ifeval("*a* *b* *c* short", json.dumps(row)) == pytest.approx(2 / 3)


def test_ground_truth_formats():
    by_full_id = {
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [{}, {"num_words": 2.0, "relation": "at least"}],
    }
    by_short_id = {
        "instruction_id": ["no_comma", "number_words"],
        "kwargs": [None, {"num_words": "2", "relation": "at least"}],
    }
    for ground_truth in (by_full_id, by_short_id, json.dumps(by_full_id), json.dumps(by_short_id)):
        assert get_verifier("ifeval")("one two", ground_truth) == 1.0
        assert get_verifier("ifeval")("one, two", ground_truth) == 0.5
    assert parse_instructions({"instruction_id_list": ["startend:quotation"]}) == [("startend:quotation", {})]


@pytest.mark.parametrize(
    "ground_truth,message",
    [
        ("not json", "not valid JSON"),
        ([1, 2], "must be a dict"),
        ({"kwargs": []}, "instruction_id_list"),
        ({"instruction_id_list": ["language:unknown_check"], "kwargs": [{"language": "en"}]}, "unknown ifeval"),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}, "one entry per instruction"),
        ({"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 5}]}, "do not fit"),
        ({"instruction_id_list": ["number_words"], "kwargs": [{"num_words": 5, "relation": "more"}]}, "must be one of"),
        ({"instruction_id_list": ["number_words"], "kwargs": [{"num_words": 2.5, "relation": "at least"}]}, "whole"),
        ({"instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": "word"}]}, "list of strings"),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"bogus": 1}]}, "do not fit"),
    ],
)
def test_malformed_ground_truth_names_the_problem(ground_truth, message):
    with pytest.raises(DataError, match=message):
        score_ifeval("text", ground_truth)


def test_sentence_counter():
    assert count_sentences("") == 0
    assert count_sentences("No terminator") == 1
    assert count_sentences("One. Two? Three!") == 3
    assert count_sentences('He said "stop." Then left.') == 2
    assert count_sentences("Pi is 3.14. Mr. Lee agrees, e.g. here.") == 2
    assert count_sentences("... !!!") == 0


ALL_INSTRUCTIONS = {
    "instruction_id_list": [case[0] for case in CASES],
    "kwargs": [case[1] for case in CASES],
}


# Degenerate texts that make naive IFEval regexes (\s* at line starts, .*? to a closing bracket)
# quadratic: at 100 kB a quadratic check would take minutes, so the time limit catches it.
PATHOLOGICAL = ["\n", " ", ".", "[", "<<", "*", "{", "P.", "Section ", "-\n", '"', "***"]


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "日本語のテキスト。絵文字 🎉🎉 and Ünïcödé — “quotes”",
        "{" * 10000,
        "[" * 50_000 + "]" * 50_000,
        *[(unit * 100_000)[:100_000] + "x" for unit in PATHOLOGICAL],
        ("Lorem ipsum, dolor sit amet. " * 40_000)[:1_000_000],
    ],
    ids=["empty", "unicode", "braces", "nested", *[f"100kB-{unit!r}" for unit in PATHOLOGICAL], "1MB-prose"],
)
def test_nasty_text_every_check_fast_and_in_range(completion):
    started = time.perf_counter()
    score = score_ifeval(completion, ALL_INSTRUCTIONS)
    assert 0.0 <= score <= 1.0
    assert time.perf_counter() - started < 3.0  # the 1 MB text takes about 0.6 s: every check is linear
