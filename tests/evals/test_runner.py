"""Eval runner: pass@k and majority vote by hand and by brute force, scores of known-right and known-wrong
models through a fake completion source, task loading, and a tiny model end to end on the hf backend."""

import itertools
import json
import math
from fractions import Fraction

import pytest

from evals.answers import answer_extractor
from evals.metrics import default_ks, majority_vote, pass_at_k
from evals.runner import evaluate_model, evaluate_tasks, format_table
from evals.tasks import EvalExample, EvalTask, load_task
from posttrain.cli import run_subcommand
from posttrain.errors import ConfigError, DataError
from posttrain.rollout.completion import Completion

# pass@k ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # pass@1 = c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
        (4, 0, 2, 0.0),  # nothing correct
        (4, 4, 1, 1.0),  # everything correct
        (4, 3, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_enumeration_over_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            correct = [i < c for i in range(n)]
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hit = sum(any(correct[i] for i in subset) for subset in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(hit, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 2000, 1000, 100  # C(2000, 100) has ~190 digits: a float quotient of the two would overflow
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001, abs=1e-15)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_default_ks():
    assert (
        default_ks(8) == [1, 2, 4, 8] and default_ks(5) == [1, 2, 4, 5] and default_ks(1) == [1] and default_ks(0) == []
    )


# majority vote ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answers, winner",
    [
        (["3", "4", "3"], 0),  # "3" has 2 votes; its first sample is 0
        ([None, "4", "3", "3"], 2),  # None does not vote
        (["4", "3", "3", "4"], 0),  # tie 2-2: the answer seen first ("4") wins
        (["3", "4", "4", "3", "5"], 0),  # tie again: "3" came first
        ([None, "5", "6"], 1),  # 1-1 tie among answers; None skipped
        ([None, None], None),  # nobody voted
        ([], None),
    ],
)
def test_majority_vote(answers, winner):
    assert majority_vote(answers) == winner


def test_answer_extractors_canonicalise_like_their_verifiers():
    gsm8k = answer_extractor("gsm8k")
    assert gsm8k("so 2.50 dollars") == gsm8k("#### 2.5") == "5/2" and gsm8k("1,000") == "1000" and gsm8k("none") is None
    assert answer_extractor("math")("so \\boxed{\\frac{1}{ 2}}") == "\\frac{1}{2}"
    assert answer_extractor("ifeval") is None


# the runner with a fake completion source --------------------------------------------------------------


class FakeGenerator:
    """Completions from `answer(example, sample_index, greedy)`; records each request's sampling."""

    def __init__(self, task: EvalTask, answer):
        self.by_prompt = {json.dumps(example.prompt): example for example in task.examples}
        self.answer = answer
        self.requests = []

    def generate(self, prompts, sampling):
        self.requests.append(sampling)
        greedy = sampling.temperature == 0
        return [
            Completion(i, j, [1], [2], self.answer(self.by_prompt[json.dumps(prompt)], j, greedy), [0.0], "stop")
            for i, prompt in enumerate(prompts)
            for j in range(sampling.n)
        ]


@pytest.fixture(scope="module")
def arithmetic_task():
    return load_task("arithmetic", num=8, seed=0)


def test_a_model_that_answers_right_scores_one_and_a_wrong_one_zero(arithmetic_task):
    right = FakeGenerator(arithmetic_task, lambda example, j, greedy: f"The answer is\n#### {example.ground_truth}")
    wrong = FakeGenerator(arithmetic_task, lambda example, j, greedy: f"#### {int(example.ground_truth) + 1 + j % 2}")
    good = evaluate_tasks(right, [arithmetic_task], samples=4)["tasks"]["arithmetic"]
    bad = evaluate_tasks(wrong, [arithmetic_task], samples=4)["tasks"]["arithmetic"]
    metrics = ["greedy_accuracy", "greedy_mean_score", "pass@1", "pass@2", "pass@4", "maj@4"]
    assert {name: good[name] for name in metrics} == dict.fromkeys(metrics, 1.0)
    assert {name: bad[name] for name in metrics} == dict.fromkeys(metrics, 0.0)
    assert good["num_prompts"] == 8 and good["verifiers"] == ["gsm8k"]
    assert good["verifier_status"] == {"ok": 8 + 8 * 4, "error": 0, "timeout": 0}
    assert [(s.n, s.temperature) for s in right.requests] == [(1, 0.0), (4, 1.0)]


def test_pass_at_k_and_majority_from_mixed_samples(arithmetic_task):
    def answer(example, j, greedy):
        truth = int(example.ground_truth)
        first_half = int(example.id.split()[1]) <= 4  # rows 1-4 vs 5-8
        # first half: samples right, wrong (+1), right, wrong (+2) -> c = 2, majority right (2 votes of 4)
        # second half: wrong (+1), right, wrong (+1), wrong (+2) -> c = 1, majority wrong (+1 twice)
        pattern = [0, 1, 0, 2] if first_half else [1, 0, 1, 2]
        return f"#### {truth if greedy else truth + pattern[j]}"

    result = evaluate_tasks(FakeGenerator(arithmetic_task, answer), [arithmetic_task], samples=4, ks=[1, 2])
    metrics = result["tasks"]["arithmetic"]
    assert metrics["greedy_accuracy"] == 1.0
    assert metrics["pass@1"] == pytest.approx((4 * 0.5 + 4 * 0.25) / 8)  # c / n per prompt
    assert metrics["pass@2"] == pytest.approx((4 * (1 - 1 / 6) + 4 * 0.5) / 8)  # 1 - C(2,2)/C(4,2); 1 - C(3,2)/C(4,2)
    assert metrics["maj@4"] == 0.5
    assert result["settings"]["ks"] == [1, 2] and "pass@4" not in metrics
    table = format_table(result)
    assert "arithmetic" in table and "pass@2" in table and "maj@4" in table


def test_ifeval_tasks_score_strictly_and_have_no_majority_vote():
    truth = {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [None, None]}
    task = EvalTask("ifeval", [EvalExample("row 1", [{"role": "user", "content": "write"}], "ifeval", truth)])
    half = FakeGenerator(task, lambda example, j, greedy: "all lowercase, but a comma")  # 1 of 2 instructions
    metrics = evaluate_tasks(half, [task], samples=2)["tasks"]["ifeval"]
    assert metrics["greedy_accuracy"] == 0.0 and metrics["greedy_mean_score"] == 0.5 and metrics["pass@2"] == 0.0
    assert metrics["maj@2"] is None
    assert (
        "-" in format_table({"settings": {"samples": 2, "ks": [1, 2]}, "tasks": {"ifeval": metrics}}).splitlines()[-1]
    )


def test_greedy_only_when_samples_is_zero(arithmetic_task):
    fake = FakeGenerator(arithmetic_task, lambda example, j, greedy: f"#### {example.ground_truth}")
    result = evaluate_tasks(fake, [arithmetic_task], samples=0)
    assert len(fake.requests) == 1 and result["settings"]["ks"] == []
    assert not any(name.startswith(("pass@", "maj@")) for name in result["tasks"]["arithmetic"])


# tasks from files --------------------------------------------------------------------------------------


def test_tasks_load_posttrain_and_hub_formats_from_files(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(
        json.dumps({"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "1 + 1?"}], "ground_truth": "2"})
        + "\n"
    )
    math_file = tmp_path / "math.jsonl"
    math_file.write_text(json.dumps({"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}) + "\n")
    task = load_task(f"gsm8k={gsm}")
    assert task.name == "gsm8k:gsm" and [e.verifier for e in task.examples] == ["gsm8k", "gsm8k"]
    assert task.examples[0].prompt == [{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"}]
    assert task.examples[1].ground_truth == "2" and task.examples[0].id == f"row 1 of {gsm}"
    assert len(load_task(f"gsm8k={gsm}", num=1).examples) == 1
    fake = FakeGenerator(
        task, lambda example, j, greedy: "#### 7" if "Tom" in example.prompt[0]["content"] else "#### 2"
    )
    assert evaluate_tasks(fake, [task], samples=1)["tasks"]["gsm8k:gsm"]["greedy_accuracy"] == 1.0
    math_task = load_task(f"math={math_file}")
    fake = FakeGenerator(math_task, lambda example, j, greedy: "so the answer is $0.5$")
    assert evaluate_tasks(fake, [math_task], samples=1)["tasks"]["math:math"]["greedy_accuracy"] == 1.0


def test_bad_task_specs_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="unknown eval task 'gsm9k'; known names: arithmetic, gsm8k, ifeval, math"):
        load_task("gsm9k")
    with pytest.raises(DataError, match=f"data file {tmp_path / 'nope.jsonl'} does not exist"):
        load_task(f"gsm8k={tmp_path / 'nope.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no label"}) + "\n")
    with pytest.raises(DataError, match=f'row 1 of {bad} has no "ground_truth"'):
        load_task(f"gsm8k={bad}")


# the tiny model end to end -----------------------------------------------------------------------------


@pytest.fixture()
def final_dir(tmp_path, tiny_model, tiny_tokenizer):
    """A final/-style directory: the tiny model and its tokenizer (with chat template) saved together."""
    path = tmp_path / "final"
    tiny_model.save_pretrained(str(path), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(path))
    return path


def test_tiny_model_end_to_end_on_the_hf_backend(final_dir, tmp_path, monkeypatch):
    from posttrain.rollout.service import RolloutService

    closed, close = [], RolloutService.close
    monkeypatch.setattr(RolloutService, "close", lambda self: closed.append(self) or close(self))
    out = tmp_path / "results.json"
    results = evaluate_model(final_dir, ["arithmetic"], num=8, samples=2, backend="hf", max_tokens=12, out=out)
    assert len(closed) == 1  # the service (its engine) is shut down before evaluate_model returns
    assert json.loads(out.read_text()) == results
    assert results["model"] == str(final_dir) and results["backend"] == "hf"
    assert results["settings"] == {
        "samples": 2,
        "ks": [1, 2],
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": 12,
        "seed": 0,
    }
    metrics = results["tasks"]["arithmetic"]
    assert metrics["num_prompts"] == 8
    for name in ("greedy_accuracy", "greedy_mean_score", "pass@1", "pass@2", "maj@2"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert sum(metrics["verifier_status"].values()) == 8 * 3


def test_command_reports_bad_model_dir_in_one_line(tmp_path, capsys):
    assert run_subcommand("eval", ["--model", str(tmp_path / "missing"), "--backend", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'missing'} is not a Hugging Face model directory" in err


def test_command_prints_the_table_and_writes_json(final_dir, tmp_path, capsys):
    out = tmp_path / "cli.json"
    args = [
        "--model",
        str(final_dir),
        "--task",
        "arithmetic",
        "--num",
        "4",
        "--samples",
        "2",
        "--backend",
        "hf",
        "--max-tokens",
        "8",
        "--out",
        str(out),
    ]
    assert run_subcommand("eval", args) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["task", "n", "greedy", "pass@1", "pass@2", "maj@2"]
    assert json.loads(out.read_text())["tasks"]["arithmetic"]["num_prompts"] == 4
