"""open-instruct's JSON constraint format (Tülu 3 RLVR data): each of the 25 function names, hand-checked."""

import json
from pathlib import Path

import pytest

from posttrain.data.prompts import build_prompt_rows
from posttrain.data.sources import read_file
from posttrain.errors import DataError
from posttrain.rewards.ifeval import INSTRUCTION_CHECKS, score_ifeval
from posttrain.rewards.ifeval_constraints import CONSTRAINT_CHECKS, is_constraint_format, parse_constraint
from posttrain.rewards.reward import score_batch

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tulu3"
# Every key a published row carries; unused ones are null (the row's function takes a few of them).
NULL_KEYS = (
    "N quantifier end_phrase keyword_list word forbidden_words letter i first_word postscript_marker options "
    "section_splitter original_prompt"
).split()


def blob(func_name: str, **arguments) -> str:
    """A ground truth as the dataset stores it: a JSON string with every key, nulls included."""
    return json.dumps({"func_name": func_name, **dict.fromkeys(NULL_KEYS), **arguments})


# (func_name, arguments, a response that satisfies it, one that violates it); the counts are done by hand.
CASES = [
    ("verify_keywords", {"keyword_list": ["novel", "Author"]}, "The AUTHOR wrote a novel.", "A novel."),
    # "cat" as a word exactly twice: "Cat ... cat" = 2; "cats" is not the word, so "cat cats" = 1.
    ("verify_keyword_frequency", {"word": "cat", "N": 2}, "Cat sat with a cat.", "cat cats"),
    ("verify_keyword_frequency", {"word": "cat", "N": 2}, "cat, cat", "cat cat cat"),
    ("validate_forbidden_words", {"forbidden_words": ["bad"]}, "A badge is fine.", "That is BAD."),
    # "banana": b-a-n-a-n-a holds 3 a's; "Aa" holds 2 (case ignored).
    ("verify_letter_frequency", {"letter": "a", "N": 3}, "banana", "Aa"),
    ("validate_response_language", {"language": "de"}, "Guten Morgen, wie geht es dir heute?", "Good morning to you."),
    ("verify_paragraph_count", {"N": 2}, "First part.\n * * * \nSecond part.", "First.\n* * *\n\n* * *\nThird."),
    ("verify_paragraph_count", {"N": 2}, "One.\n* * *\nTwo.", "One.\n***\nTwo."),
    # 5 whitespace words; "around 5" allows 4..6 (max(round(0.5), 1) = 1).
    ("validate_word_constraint", {"N": 5, "quantifier": "at most"}, "one two three four five", "a b c d e f"),
    ("validate_word_constraint", {"N": 5, "quantifier": "at least"}, "a b c d e", "a b c d"),
    ("validate_word_constraint", {"N": 5, "quantifier": "around"}, "a b c d e f", "a b c d e f g"),
    # 3 sentences; "around 5" allows 4..6, "at most 2" fails on 3.
    ("verify_sentence_constraint", {"N": 2, "quantifier": "at most"}, "One. Two.", "One. Two. Three."),
    ("verify_sentence_constraint", {"N": 5, "quantifier": "around"}, "Go. Run. Sit. Eat.", "Go. Run. Sit."),
    (
        "validate_paragraphs",
        {"N": 2, "i": 2, "first_word": "then"},
        "First we wait.\n\nThen we go.",
        "First we wait.\n\nAfter that we go.",
    ),
    ("verify_postscript", {"postscript_marker": "P.S."}, "Bye.\nP.S. see you", "Bye. PS see you"),
    ("validate_placeholders", {"N": 2}, "Dear [name], at [address].", "Dear [name]."),
    ("verify_bullet_points", {"N": 3}, "* a\n* b\n* c", "* a\n* b"),
    ("validate_title", {}, "<<Ode to Rain>>\nDrops.", "Ode to Rain\nDrops."),
    (
        "validate_choice",
        {"options": "('My answer is yes.', 'My answer is no.', 'My answer is maybe.')"},
        "I think... My answer is no.",
        "I think not.",
    ),
    ("validate_choice", {"options": ["a)", "b)"]}, "b)", "c)"),
    ("validate_highlighted_sections", {"N": 2}, "*one* and *two*", "*one* only"),
    ("validate_sections", {"N": 2, "section_splitter": "Section"}, "Section 1\nA\nSection 2\nB", "Section 1\nA"),
    ("validate_json_format", {}, '{"answer": 42}', "answer: 42"),
    ("validate_repeat_prompt", {"original_prompt": "Write a poem."}, "Write a poem. Roses...", "Roses..."),
    ("validate_two_responses", {}, "Yes.\n******\nNo.", "Yes.\n******\nYes."),
    ("validate_uppercase", {}, "ALL CAPS HERE.", "Not all caps."),
    ("validate_lowercase", {}, "all lower here.", "Not all lower."),
    # all-capital words: "NASA", "USA" = 2; "at least 2" fails on "NASA only" (1); "around 2" allows 1..3.
    ("validate_frequency_capital_words", {"N": 2, "quantifier": "at least"}, "NASA in the USA", "NASA only"),
    ("validate_frequency_capital_words", {"N": 2, "quantifier": "around"}, "A B C", "A B C D"),
    ("validate_end", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Any other questions? No."),
    ("validate_quotation", {}, '"Quoted."', '"Half quoted.'),
    ("validate_no_commas", {}, "No commas here.", "Commas, here."),
]


@pytest.mark.parametrize("func_name, arguments, satisfied, violated", CASES)
def test_each_constraint_satisfied_and_violated(func_name, arguments, satisfied, violated):
    ground_truth = blob(func_name, **arguments)
    assert score_ifeval(satisfied, ground_truth) == 1.0
    assert score_ifeval(violated, ground_truth) == 0.0


def test_all_25_functions_and_all_25_ifeval_types_are_covered():
    assert len(CONSTRAINT_CHECKS) == 25 and {case[0] for case in CASES} == set(CONSTRAINT_CHECKS)
    assert len(INSTRUCTION_CHECKS) == 25 and "language:response_language" in INSTRUCTION_CHECKS


def test_response_language_in_the_ifeval_format():
    ground_truth = {"instruction_id_list": ["language:response_language"], "kwargs": [{"language": "fr"}]}
    assert score_ifeval("Bonjour, je suis très content de vous voir aujourd'hui.", ground_truth) == 1.0
    assert score_ifeval("Hello, I am very happy to see you today.", ground_truth) == 0.0
    assert score_ifeval("12345 !!!", ground_truth) == 1.0  # nothing to detect: passes, as in the reference


def test_a_list_of_constraints_scores_the_fraction_satisfied():
    ground_truth = json.dumps([json.loads(blob("validate_lowercase")), json.loads(blob("validate_no_commas"))])
    assert score_ifeval("lower, with a comma", ground_truth) == 0.5


@pytest.mark.parametrize(
    "constraint, message",
    [
        ({"func_name": "validate_nothing"}, "unknown ifeval constraint func_name"),
        ({"func_name": "verify_bullet_points"}, "do not fit verify_bullet_points"),
        ({"func_name": "verify_bullet_points", "N": 2.5}, "must be a whole number"),
        ({"func_name": "validate_word_constraint", "N": 3, "quantifier": "exactly"}, "quantifier"),
        ({"func_name": "validate_title", "N": 3}, "do not fit validate_title"),
    ],
)
def test_malformed_constraints_raise_data_error(constraint, message):
    with pytest.raises(DataError, match=message):
        parse_constraint(constraint)


def test_format_detection():
    assert is_constraint_format(blob("validate_title"))
    assert not is_constraint_format({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    assert not is_constraint_format("42")


def test_tulu_fixture_rows_end_to_end():
    """The shipped RLVR rows: dataset -> verifier through the default map, then the row's ground truth scores
    completions written to satisfy (or break) each row's constraint or answer."""
    prompts = build_prompt_rows(
        read_file(FIXTURES / "rlvr.jsonl"), True, None, {"gsm8k": "gsm8k", "MATH": "math", "ifeval": "ifeval"}
    )
    right = {
        "gsm8k": ["3 x 4 = 12, minus 2 is 10.", "$1,200 - $200 = $1,000. The answer is 1,000."],
        "math": ["$\\frac12 + \\frac14 = \\boxed{\\frac{3}{4}}$", "$2x = 8$, so $x = \\boxed{4}$."],
        "ifeval": [
            "the sun climbs slowly over the quiet hills.",
            "* more energy\n* better sleep\n* a stronger heart",
            "Plants turn light, water and air into sugar and oxygen.",
            "This novel by a great author is worth reading.",
            "Hallo mein Freund, wie geht es dir heute? Schön, dich zu sehen.",
        ],
    }
    completions = [right[prompt.verifier][sum(p.verifier == prompt.verifier for p in prompts[:i])]
                   for i, prompt in enumerate(prompts)]  # fmt: skip
    rows = [{"verifier": p.verifier, "ground_truth": p.ground_truth} for p in prompts]
    rewards, counts = score_batch(rows, completions, [True] * len(rows))
    assert counts == {"ok": len(rows), "error": 0, "timeout": 0}
    assert rewards == [10.0] * len(rows)
    wrong = ["The answer is 11."] * 2 + ["\\boxed{1}"] * 2
    wrong += ["The Sun Rises.", "No bullets here.", "word " * 21, "A good book.", "Hello my friend, how are you today?"]
    rewards, _ = score_batch(rows, wrong, [True] * len(rows))
    assert rewards == [0.0] * len(rows)
