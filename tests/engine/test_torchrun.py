"""ZeRO-2 and ZeRO-3 under torchrun with 2 CPU processes match the single-process run."""

import subprocess
import sys

import pytest
from helpers import cli_env, run_posttrain

from posttrain.engine.distributed import free_port
from posttrain.logging import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

ARGS = [
    "data.num_train=256",
    "data.num_eval=16",
    "logger.progress_bar=false",
    "train.max_steps=6",
    "optim.lr=3e-3",
    "optim.warmup_ratio=0",
]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    result = run_posttrain(f"run_dir={run_dir}", "train.micro_batch_size=8", *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_process_zero_matches_single_process(zero, tmp_path, single_process_losses):
    run_dir = tmp_path / zero
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "posttrain",
        f"run_dir={run_dir}",
        f"deepspeed={zero}",
        "train.micro_batch_size=4",
        *ARGS,
    ]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    # Same examples per step (4 per rank x 2 ranks = 8), so the same curve up to float reduction order.
    assert losses == pytest.approx(single_process_losses, rel=1e-4)
    assert losses[-1] < losses[0]
    assert (run_dir / "checkpoints" / "step_6" / "rng_rank1.pt").exists()
    assert (run_dir / "final" / "model.safetensors").exists()
