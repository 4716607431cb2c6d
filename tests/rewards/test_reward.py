"""score_completion / score_batch / verifiable_reward: statuses, counting, rewards, registry."""

import threading
import time

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.registry import Registry
from posttrain.rewards import VERIFIERS
from posttrain.rewards.reward import run_verifier, score_batch, score_completion, verifiable_reward

GSM8K_ROW = {"verifier": "gsm8k", "ground_truth": "#### 72"}
RELEASE = threading.Event()  # lets abandoned sleeping verifiers finish at the end of the module


@pytest.fixture(autouse=True, scope="module")
def _release_sleepers():
    yield
    RELEASE.set()


def _test_registry():
    registry = Registry("verifier")
    registry.register("exact")(lambda completion, ground_truth: float(completion == ground_truth))
    registry.register("sleeps")(lambda completion, ground_truth: time.sleep(5))
    registry.register("raises")(lambda completion, ground_truth: {}["missing"])
    registry.register("out_of_range")(lambda completion, ground_truth: 1.5)
    registry.register("nan")(lambda completion, ground_truth: float("nan"))
    registry.register("not_a_number")(lambda completion, ground_truth: "1.0")
    return registry


def test_registered_verifiers():
    assert VERIFIERS.names() == ["f1", "gsm8k", "ifeval", "math", "string_match"]


def test_score_completion_ok():
    assert score_completion("gsm8k", "so 72", "72") == (1.0, "ok")
    assert score_completion("math", "\\boxed{0.5}", "\\frac{1}{2}") == (1.0, "ok")
    assert score_completion("gsm8k", "so 71", "72") == (0.0, "ok")


def test_unknown_verifier_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown verifier 'gsm9k'.*f1, gsm8k, ifeval, math, string_match"):
        score_completion("gsm9k", "72", "72")


def test_timeout_path_sleeping_verifier_is_cut_off():
    started = time.perf_counter()
    assert score_completion("sleeps", "x", "y", timeout_s=0.1, registry=_test_registry()) == (0.0, "timeout")
    assert time.perf_counter() - started < 2.0


def test_timeout_path_from_a_non_main_thread():
    sleeper = lambda completion, ground_truth: RELEASE.wait(10)  # noqa: E731
    results = []
    worker = threading.Thread(target=lambda: results.append(run_verifier(sleeper, "x", "y", timeout_s=0.1)))
    started = time.perf_counter()
    worker.start()
    worker.join(5)
    assert results == [(0.0, "timeout")]
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("name", ["raises", "out_of_range", "nan", "not_a_number"])
def test_error_path_is_scored_zero_and_reported(name):
    assert score_completion(name, "x", "y", registry=_test_registry()) == (0.0, "error")


def test_malformed_ground_truth_is_an_error_not_a_crash():
    assert score_completion("gsm8k", "72", "no number") == (0.0, "error")
    assert score_completion("ifeval", "text", {"instruction_id_list": ["nope"]}) == (0.0, "error")


def test_symbolic_hang_is_counted_as_timeout():
    """The outer deadline (shorter than math's own) cuts sympy off and reports it as a timeout."""
    slow = "\\boxed{" + "{" * 9 + "1" + "}" * 9 + "}"  # about 1.5 s of ANTLR parsing
    assert score_completion("math", slow, "1", timeout_s=0.2) == (0.0, "timeout")


@pytest.mark.parametrize(
    "score,finished,verification_reward,nonstop_penalty,expected",
    [
        (1.0, True, 10.0, 0.0, 10.0),  # 10 x 1
        (0.5, True, 10.0, -10.0, 5.0),  # 10 x 0.5, stopped: no penalty
        (1.0, False, 10.0, -10.0, 0.0),  # 10 x 1 - 10
        (0.0, False, 10.0, -10.0, -10.0),  # 0 - 10
        (0.25, False, 4.0, -1.0, 0.0),  # 4 x 0.25 - 1
    ],
)
def test_verifiable_reward(score, finished, verification_reward, nonstop_penalty, expected):
    assert verifiable_reward(score, finished, verification_reward, nonstop_penalty) == pytest.approx(expected)


def test_positive_nonstop_penalty_is_rejected():
    with pytest.raises(ConfigError, match="nonstop_penalty must be <= 0"):
        verifiable_reward(1.0, False, nonstop_penalty=10.0)


def test_score_batch_rewards_and_counts():
    registry = _test_registry()
    rows = [
        {"verifier": "exact", "ground_truth": "a"},
        {"verifier": "exact", "ground_truth": "a"},
        {"verifier": "raises", "ground_truth": "a"},
        {"verifier": "sleeps", "ground_truth": "a"},
        {"verifier": "exact", "ground_truth": "a"},
    ]
    completions = ["a", "b", "a", "a", "a"]
    finished = [True, True, True, True, False]
    rewards, counts = score_batch(
        rows, completions, finished, verification_reward=10.0, nonstop_penalty=-10.0, timeout_s=0.1, registry=registry
    )
    assert rewards == [10.0, 0.0, 0.0, 0.0, 0.0]  # the last: 10 x 1 - 10 for not stopping
    assert counts == {"ok": 3, "error": 1, "timeout": 1}


def test_score_batch_with_the_real_verifiers():
    rows = [
        GSM8K_ROW,
        {"verifier": "math", "ground_truth": "\\frac{1}{2}"},
        {"verifier": "ifeval", "ground_truth": '{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}'},
        {"verifier": "string_match", "ground_truth": ["Paris", "Paris, France"]},
        {"verifier": "f1", "ground_truth": "Denver Broncos"},
    ]
    completions = ["... so 72.", "$\\boxed{0.5}$", "no commas", "paris!", "the Broncos"]
    rewards, counts = score_batch(rows, completions, [True] * 5)
    assert rewards == pytest.approx([10.0, 10.0, 10.0, 10.0, 10 * 2 / 3])
    assert counts == {"ok": 5, "error": 0, "timeout": 0}


def test_score_batch_from_a_non_main_thread_cuts_off_a_huge_power():
    """RLVR's reward path off the main thread: the symbolic hang is killed at the deadline, the rest score."""
    rows = [GSM8K_ROW, {"verifier": "math", "ground_truth": "1"}, {"verifier": "math", "ground_truth": "x^2"}]
    completions = ["so 72", "\\boxed{10^{10^{10}}}", "\\boxed{x \\cdot x}"]
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(score_batch(rows, completions, [True] * 3, timeout_s=2.0)))
    worker.daemon = True
    started = time.perf_counter()
    worker.start()
    worker.join(30)
    assert outcome, "score_batch did not return"
    rewards, counts = outcome[0]
    assert rewards == [10.0, 0.0, 10.0]
    assert counts == {"ok": 2, "error": 0, "timeout": 1}
    assert time.perf_counter() - started < 8.0  # two deadlines at most (the hang, a cold worker start)


def test_score_batch_validates_before_scoring():
    with pytest.raises(DataError, match="one row and one finished flag per completion"):
        score_batch([GSM8K_ROW], ["72", "72"], [True, True])
    with pytest.raises(DataError, match='rollout row 1 has no "ground_truth" field'):
        score_batch([GSM8K_ROW, {"verifier": "gsm8k"}], ["72", "72"], [True, True])
    with pytest.raises(ConfigError, match="unknown verifier 'nope'"):
        score_batch([GSM8K_ROW, {"verifier": "nope", "ground_truth": 1}], ["72", "72"], [True, True])


NASTY_COMPLETIONS = {
    "empty": "",
    "unicode": "答案 🎉 Ünïcödé −3 ½ \u0000 \ud7ff",
    "thousands": "1,000",
    "negative": "-3",
    "fraction": "\\frac{1}{2}",
    "malformed-latex": "\\boxed{\\frac{",
    "deep-braces": "{" * 10000,
    "deep-box": "\\boxed{" + "{" * 10000,
    "1MB": ("The answer is \\boxed{1,000} or $-3$. " * 26_000)[:1_000_000],
}
GROUND_TRUTHS = {
    "gsm8k": "#### 1,000",
    "math": "0.5",
    "ifeval": {
        "instruction_id_list": ["punctuation:no_comma", "number_words"],
        "kwargs": [{}, {"num_words": 3, "relation": "less than"}],
    },
    "string_match": ["1000", "-3"],
    "f1": "one half",
}


@pytest.mark.parametrize("name", sorted(NASTY_COMPLETIONS))
def test_every_registered_verifier_survives_nasty_text(name):
    assert set(GROUND_TRUTHS) == set(VERIFIERS.names())
    for verifier_name, ground_truth in GROUND_TRUTHS.items():
        started = time.perf_counter()
        score, status = score_completion(verifier_name, NASTY_COMPLETIONS[name], ground_truth)
        assert status == "ok", (verifier_name, status)
        assert 0.0 <= score <= 1.0
        assert time.perf_counter() - started < 3.0, verifier_name
