"""MATH verifier: answer extraction rules, symbolic equivalence, bounded time on malformed LaTeX."""

import threading
import time

import pytest

from posttrain.errors import DataError
from posttrain.rewards import get_verifier, math_answer
from posttrain.rewards.math_answer import (
    MAX_ANSWER_CHARS,
    answers_equivalent,
    extract_answer,
    gold_answer,
    last_boxed,
    quick_equivalent,
    score_math,
)
from posttrain.rewards.symbolic import shared_pool

# MATH test set, algebra (Hendrycks et al. 2021; also the first MATH-500 problem): the reference solution.
ASYMPTOTES_SOLUTION = (
    "The denominator of the rational function factors into $x^2+x-6=(x-2)(x+3)$. Since the numerator is "
    "always nonzero, there is a vertical asymptote whenever the denominator is $0$, which occurs for "
    "$x = 2$ and $x = -3$.  Therefore, the graph has $\\boxed{2}$ vertical asymptotes."
)
# Balanced nested braces: latex2sympy's ANTLR parser needs about 1.5 s for 9 levels (exponential in
# depth), and the answer equals 1, so a score of 0 below means the timeout cut the parse off.
SLOW_TO_PARSE = "\\boxed{" + "{" * 9 + "1" + "}" * 9 + "}"


def test_published_math_solution():
    assert gold_answer(ASYMPTOTES_SOLUTION) == "2"
    assert score_math(ASYMPTOTES_SOLUTION, ASYMPTOTES_SOLUTION) == 1.0
    assert score_math("Two factors vanish, so the answer is $\\boxed{2}$.", ASYMPTOTES_SOLUTION) == 1.0
    assert score_math("So there are \\boxed{3} asymptotes.", ASYMPTOTES_SOLUTION) == 0.0
    assert get_verifier("math") is score_math


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so \\boxed{\\frac{1}{2}} and done", "\\frac{1}{2}"),
        ("first \\boxed{1}, finally \\boxed{\\dfrac{\\sqrt{3}}{2}}.", "\\dfrac{\\sqrt{3}}{2}"),
        ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not groups
        ("$\\boxed 5$ apples", "5"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed {7}", "7"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
        ("the final answer is 12.\nThen more text", "12"),
        ("We get $x=4$ and then $y = 5$.", "y = 5"),
        ("\\boxed{\\frac{", None),  # the last box never closes
        ("\\boxed{}", None),
        ("\\boxedfoo{1}", None),
        ("no math here", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_last_boxed_takes_the_innermost_last_box():
    assert last_boxed("\\boxed{\\boxed{5}}") == "5"
    assert last_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"


@pytest.mark.parametrize(
    "completion,ground_truth",
    [
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{1/2}", "$\\frac12$"),
        ("\\boxed{x = 5}", 5),
        ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
        ("\\boxed{(x+1)^2}", "x^2+2x+1"),
        ("\\boxed{-3}", -3),
        ("\\boxed{1,000}", "1000"),
        ("The final answer is $2\\sqrt{3}$. I hope it is correct.", "\\sqrt{12}"),
    ],
)
def test_equivalent_answers(completion, ground_truth):
    assert score_math(completion, ground_truth) == 1.0


@pytest.mark.parametrize(
    "completion,ground_truth",
    [("\\boxed{0.51}", "\\frac{1}{2}"), ("\\boxed{-3}", 3), ("\\boxed{x^2}", "x^3")],
)
def test_different_answers(completion, ground_truth):
    assert score_math(completion, ground_truth) == 0.0


@pytest.mark.parametrize("ground_truth", ["", "   ", "\\boxed{\\frac{", None, ["1"], True])
def test_malformed_ground_truth_raises_data_error(ground_truth):
    with pytest.raises(DataError, match="math ground_truth"):
        score_math("\\boxed{1}", ground_truth)


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "答案是 $\\frac{1}{2}$ 🎉 Ünïcödé \\boxed{½}",
        "{" * 10000,
        "\\boxed{" + "{" * 10000,
        "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
        "$" + "{" * 10000 + "$",
        "\\boxed{\\frac{",
        "\\boxed{\\frac{1}{2}" * 100_000,
        ("We compute $x^2$ step by step. " * 35_000)[:1_000_000],
        "\\boxed{" + "a" * 1_000_000 + "}",
        "$" * 1_000_000,
        "\\" * 1_000_000,
    ],
    ids=[
        "empty",
        "unicode",
        "braces",
        "open-box",
        "deep-box",
        "deep-dollar",
        "malformed",
        "repeated-open",
        "1MB-prose",
        "1MB-box",
        "1MB-dollars",
        "1MB-backslashes",
    ],
)
def test_nasty_text_scores_zero_in_bounded_time(completion):
    started = time.perf_counter()
    assert score_math(completion, "\\frac{1}{2}", timeout_s=1.0) == 0.0
    assert time.perf_counter() - started < 3.0


def test_overlong_answer_is_not_parsed():
    assert extract_answer("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}") is None


def test_slow_latex_is_cut_off_by_the_timeout_in_the_main_thread():
    started = time.perf_counter()
    assert score_math(SLOW_TO_PARSE, "1", timeout_s=0.2) == 0.0
    assert time.perf_counter() - started < 2.0


# Each is one big-integer power inside sympy: a C call that holds the GIL, so neither SIGALRM nor a thread's
# join(timeout) could stop it (40-120 s seen before the symbolic check moved into killable worker processes).
HUGE_POWERS = ["\\boxed{10^{10^{10}}}", "$2^{2^{100}}$", "$9^{9^{9}}$", "\\boxed{7^{7^{7^{7}}}}"]


def _in_thread(fn, limit_s: float):
    """fn() in a fresh non-main thread, waited for at most `limit_s` seconds: (result or None, seconds)."""
    results = []
    worker = threading.Thread(target=lambda: results.append(fn()), daemon=True)
    started = time.perf_counter()
    worker.start()
    worker.join(limit_s)
    return (results[0] if results else None), time.perf_counter() - started


def test_huge_powers_return_within_the_deadline_from_a_non_main_thread():
    # Warm the pool first: a worker's start-up (importing math_verify) is not what is being timed here.
    assert _in_thread(lambda: score_math("\\boxed{x^2+2x+1}", "(x+1)^2", timeout_s=30), 60)[0] == 1.0
    killed_before = shared_pool().killed
    for completion in HUGE_POWERS:
        score, seconds = _in_thread(lambda completion=completion: score_math(completion, "1", timeout_s=1.0), 20)
        assert score == 0.0, completion
        assert seconds < 2.5, (completion, seconds)
    assert shared_pool().killed - killed_before == len(HUGE_POWERS)
    # The killed workers were replaced: symbolic checks still work.
    assert _in_thread(lambda: score_math("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", timeout_s=30), 60)[0] == 1.0


@pytest.mark.parametrize(
    "gold,predicted,expected",
    [
        ("72", "72", True),
        ("72", "71", False),
        ("-3", "3", False),
        ("\\frac{1}{2}", "0.5", True),
        ("7/2", "\\dfrac{7}{2}", True),
        ("2.50", "2.5", True),
        ("x + 1", "x+1", True),
        ("\\left(1, 2\\right)", "(1,2)", True),
        ("5", "5.", True),
        ("0.51", "\\frac{1}{2}", None),  # math_verify rounds decimals: its call
        ("\\sin x", "\\sinx", None),
        ("x = 5", "5", None),
    ],
)
def test_fast_path_decides_plain_answers_without_a_worker(gold, predicted, expected, monkeypatch):
    assert quick_equivalent(gold, predicted) is expected
    if expected is not None:

        def no_worker():
            raise AssertionError("the fast path went to the symbolic worker")

        monkeypatch.setattr(math_answer, "shared_pool", no_worker)
        assert answers_equivalent(gold, predicted) is expected
