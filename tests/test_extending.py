"""A new algorithm is a module + a YAML + a test: the toy one in tests/fixtures/toy_algorithm runs through the
real CLI from outside the package (POSTTRAIN_ALGORITHMS + hydra.searchpath), and learns."""

import subprocess
from pathlib import Path

import pytest
from helpers import cli_env, posttrain_command

from posttrain.logging import read_metrics

TOY = Path(__file__).parent / "fixtures" / "toy_algorithm"


def run_toy(*overrides):
    env = cli_env()
    env["PYTHONPATH"] = f"{TOY}:{env['PYTHONPATH']}"
    env["POSTTRAIN_ALGORITHMS"] = "toy_algorithm"
    command = posttrain_command(f"hydra.searchpath=[file://{TOY / 'conf'}]", "algo=toy", *overrides)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_an_algorithm_from_outside_the_package_runs_through_the_cli_and_learns(tmp_path):
    result = run_toy(f"run_dir={tmp_path}", "train.max_steps=6", "train.eval_every=3", "optim.lr=3e-3",
                     "optim.warmup_ratio=0", "logger.progress_bar=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_reply_logprob"] for m in metrics if "eval_reply_logprob" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert len(evals) == 3 and evals[-1] > evals[0]  # steps 0, 3, 6
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert "reply: 7 + 5 = 12" in (tmp_path / "config.yaml").read_text()


def test_a_bad_key_of_the_new_algorithm_fails_in_one_line_before_anything_is_written(tmp_path):
    result = run_toy(f"run_dir={tmp_path}", "algo.nonsense=1")
    assert result.returncode == 2
    assert "nonsense" in result.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_a_loss_of_the_wrong_family_fails_in_one_line_before_anything_is_written(tmp_path):
    command = posttrain_command(f"run_dir={tmp_path}", "algo=dpo", "algo.loss=bt")
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "'bt' is a reward-model loss, not a preference-pair loss" in errors[0], errors
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
