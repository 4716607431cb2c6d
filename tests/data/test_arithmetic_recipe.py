"""data_recipes.arithmetic: disjoint splits, column work, and the noisy-annotator option."""

import pytest

from data_recipes import generate_task
from data_recipes.arithmetic import column_steps
from posttrain.errors import ConfigError
from posttrain.rewards.reward import score_completion

STEPS = {"operations": "+", "steps": True}


def answer(row):
    return row["messages"][-1]["content"]


def test_train_and_held_out_questions_are_disjoint():
    train = {row["prompt"][0]["content"] for row in generate_task("arithmetic", "train", 2000, 0, **STEPS)}
    held_out = {row["prompt"][0]["content"] for row in generate_task("arithmetic", "eval", 200, 0, **STEPS)}
    assert len(train) == 2000 and len(held_out) == 200 and not train & held_out


def test_column_work_is_correct_and_verifies():
    assert column_steps(58, 67) == ["8 + 7 + 0 = 15", "5 + 6 + 1 = 12"]  # the last carry goes straight into the answer
    for row in generate_task("arithmetic", "train", 200, 0, **STEPS):
        assert score_completion("gsm8k", answer(row), row["ground_truth"])[0] == 1.0


def test_noise_forgets_the_units_carry_in_that_share_of_carry_problems_only():
    clean = generate_task("arithmetic", "train", 2000, 0, **STEPS)
    noisy = generate_task("arithmetic", "train", 2000, 0, **STEPS, noise=0.6)
    assert [row["prompt"] for row in clean] == [row["prompt"] for row in noisy]  # same problems
    assert [row["ground_truth"] for row in clean] == [row["ground_truth"] for row in noisy]  # truth unchanged
    carry_rows = [
        i
        for i, row in enumerate(clean)  # a units carry into a tens column
        if int(answer(row).splitlines()[0].split(" = ")[1]) >= 10 and len(answer(row).splitlines()) > 2
    ]
    corrupted = [i for i, row in enumerate(noisy) if row.get("noisy")]
    assert set(corrupted) <= set(carry_rows)
    assert len(corrupted) / len(carry_rows) == pytest.approx(0.6, abs=0.05)
    for i in corrupted:
        lines = answer(noisy[i]).splitlines()
        assert lines[0] == answer(clean[i]).splitlines()[0]  # the units column is right ...
        assert lines[1].split(" + ")[2].startswith("0")  # ... but its carry never arrives
        assert score_completion("gsm8k", answer(noisy[i]), noisy[i]["ground_truth"])[0] == 0.0
    for i in set(range(len(clean))) - set(corrupted):
        assert answer(noisy[i]) == answer(clean[i])
    assert generate_task("arithmetic", "train", 300, 0, **STEPS, noise=0.0) == clean[:300]


def test_noise_never_touches_the_held_out_split_and_rejects_bad_values():
    assert generate_task("arithmetic", "eval", 100, 0, **STEPS, noise=0.9) == generate_task(
        "arithmetic", "eval", 100, 0, **STEPS
    )
    with pytest.raises(ConfigError, match="task generator 'arithmetic' .train split, 10 rows.: noise must be in"):
        generate_task("arithmetic", "train", 10, 0, **STEPS, noise=1.0)
    with pytest.raises(ConfigError, match="steps=True"):
        generate_task("arithmetic", "train", 10, 0, noise=0.5)
    with pytest.raises(ConfigError, match="only ~1000 held-out 2-digit problems exist; ask for at most 500"):
        generate_task("arithmetic", "eval", 501, 0, **STEPS)
    with pytest.raises(
        ConfigError, match="task generator 'arithmetic': .*unexpected keyword argument 'nosie'.*generator_kwargs"
    ):
        generate_task("arithmetic", "train", 10, 0, **STEPS, nosie=0.5)
