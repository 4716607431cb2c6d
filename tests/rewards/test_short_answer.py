"""string_match and f1: SQuAD normalisation, token F1 arithmetic, lists of answers, nasty text."""

import time

import pytest

from posttrain.errors import DataError
from posttrain.rewards import get_verifier
from posttrain.rewards.short_answer import normalize_answer, score_f1, score_string_match, token_f1


def test_squad_normalisation():
    assert normalize_answer("  The Eiffel   Tower!! ") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_string_match():
    assert score_string_match("The Denver Broncos.", "Denver Broncos") == 1.0
    assert score_string_match("Denver", "Denver Broncos") == 0.0
    assert score_string_match("carolina panthers", ["Denver Broncos", "Carolina Panthers"]) == 1.0
    assert score_string_match("1945", 1945) == 1.0
    assert get_verifier("string_match") is score_string_match


def test_token_f1_hand_computed():
    # prediction "denver broncos won" vs reference "denver broncos": shared 2,
    # precision 2/3, recall 2/2, F1 = 2 * (2/3 * 1) / (2/3 + 1) = 0.8
    assert token_f1("The Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count min(3, 1) = 1 time: precision 1/3, recall 1, F1 = 0.5
    assert token_f1("paris paris paris", "Paris") == pytest.approx(0.5)
    assert token_f1("london", "paris") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation (SQuAD v2.0 rule)
    assert token_f1("", "paris") == 0.0


def test_f1_takes_the_best_acceptable_answer():
    assert score_f1("Denver Broncos", ["Broncos", "Denver Broncos", "Carolina"]) == 1.0
    assert score_f1("the Broncos", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert get_verifier("f1") is score_f1


@pytest.mark.parametrize("ground_truth", [[], None, {"a": 1}, [None], b"bytes"])
def test_malformed_ground_truth_raises_data_error(ground_truth):
    for verifier in (score_string_match, score_f1):
        with pytest.raises(DataError, match="ground_truth"):
            verifier("answer", ground_truth)


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "Ünïcödé 北京 🎉",
        "{" * 10000,
        "\\boxed{\\frac{",
        ("the answer is paris " * 55_000)[:1_000_000],
        "a" * 1_000_000,
    ],
    ids=["empty", "unicode", "braces", "latex", "1MB-text", "1MB-token"],
)
def test_nasty_text_is_fast_and_in_range(completion):
    started = time.perf_counter()
    for verifier in (score_string_match, score_f1):
        assert 0.0 <= verifier(completion, ["Paris", "北京"]) <= 1.0
    assert time.perf_counter() - started < 3.0
    assert score_string_match("  北京 ", "北京") == 1.0
