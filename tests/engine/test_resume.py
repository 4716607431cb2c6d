"""Kill a run with SIGKILL mid-training, restart the same command: the loss curve continues exactly."""

import signal
import subprocess
import time

import pytest
from helpers import cli_env, posttrain_command, run_posttrain

from posttrain.engine.checkpoint import list_checkpoints
from posttrain.logging import read_metrics

pytestmark = pytest.mark.integration

ARGS = [
    "data.num_train=512",
    "data.num_eval=0",
    "logger.progress_bar=false",
    "train.max_steps=40",
    "checkpoint.every=10",
    "checkpoint.keep_last=5",
    "optim.lr=3e-3",
]


def losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def kill_after_step(command, run_dir, step, timeout=300):
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if max(losses(run_dir), default=0) >= step:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended (code {process.returncode}) before reaching step {step}; cannot test the kill")


def test_sigkill_then_same_command_continues_the_exact_loss_curve(tmp_path):
    reference = tmp_path / "uninterrupted"
    result = run_posttrain(f"run_dir={reference}", *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]

    run_dir = tmp_path / "killed"
    command = posttrain_command(f"run_dir={run_dir}", *ARGS)
    kill_after_step(command, run_dir, step=13)
    assert [step for step, _ in list_checkpoints(run_dir)] == [10]
    assert not (run_dir / "final").exists()

    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr
    assert losses(run_dir) == losses(reference)  # identical floats, every step 1..40
    assert sorted(losses(run_dir)) == list(range(1, 41))
