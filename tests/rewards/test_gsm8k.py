"""GSM8K verifier: last-number rule, separators, signs, decimals, label formats, nasty text."""

import time
from fractions import Fraction

import pytest

from posttrain.errors import DataError
from posttrain.rewards import get_verifier
from posttrain.rewards.gsm8k import label_number, last_number, score_gsm8k

# GSM8K train example 0 (Cobbe et al. 2021): the reference answer, calculator annotations included.
NATALIA_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


def test_published_gsm8k_answer_is_both_label_and_correct_completion():
    assert label_number(NATALIA_ANSWER) == 72
    assert score_gsm8k(NATALIA_ANSWER, NATALIA_ANSWER) == 1.0
    assert score_gsm8k("In May she sold 24, so 48 + 24 = 72 clips in total.", NATALIA_ANSWER) == 1.0
    assert score_gsm8k("She sold 72 clips, then 24 more.", NATALIA_ANSWER) == 0.0  # the last number counts
    assert get_verifier("gsm8k") is score_gsm8k


@pytest.mark.parametrize(
    "completion,label",
    [
        ("The total is 1,000.", "1000"),
        ("The total is 1000", "1,000"),
        ("It costs $1,234,567.00 in all.", 1234567),
        ("The temperature drops to -3.", -3),
        ("x = −3", "-3"),  # Unicode minus
        ("She pays 2.50 dollars.", "2.5"),
        ("She pays 2.5 dollars.", 2.50),
        ("That is 72.0", "#### 72"),
        ("#### 42", 42),
        ("The answer: #### 42\nI am confident.", "42"),
        ("Half is .5", 0.5),
        ("0.1 of the pie", 0.1),
        ("Steps 1, 2, 3", 3),  # "1, 2, 3" are separate numbers, not 123
    ],
)
def test_matching_answers(completion, label):
    assert score_gsm8k(completion, label) == 1.0


@pytest.mark.parametrize(
    "completion,label",
    [
        ("72 clips, and 24 in May", 72),
        ("It dropped 3-4 degrees", -4),  # a hyphen after a digit is not a sign
        ("The answer is 7.", 72),
        ("1,0000", 10000),  # not a thousands separator: 1 then 0000
        ("no number at all", 5),
    ],
)
def test_mismatching_answers(completion, label):
    assert score_gsm8k(completion, label) == 0.0


def test_last_number_parsing():
    assert last_number("a -12.50 b") == Fraction(-25, 2)
    assert last_number("ends with a period 7.") == 7
    assert last_number("") is None
    assert last_number("9" * 101) is None  # too long to be an answer


@pytest.mark.parametrize("label", ["no digits here", "####", None, True, float("nan"), [72]])
def test_malformed_label_raises_data_error(label):
    with pytest.raises(DataError, match="gsm8k ground_truth"):
        score_gsm8k("72", label)


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "答案是 ٧٢ 🎉 Ünïcödé",  # Arabic-Indic digits are not read as 72
        "{" * 10000,
        "\\boxed{\\frac{",
        "9" * 1_000_000,
        "1," * 50_000,
        ("-" * 100_000) + " 72",
        ("The answer is 5. " * 60_000)[:1_000_000] + " so 72",
    ],
    ids=["empty", "unicode", "braces", "latex", "1MB-digits", "100kB-commas", "100kB-dashes", "1MB-text"],
)
def test_nasty_text_is_fast_and_in_range(completion):
    started = time.perf_counter()
    score = score_gsm8k(completion, 72)
    assert score in (0.0, 1.0)
    assert time.perf_counter() - started < 3.0  # linear: a quadratic scan of these would take minutes
    if completion.endswith("72"):
        assert score == 1.0
