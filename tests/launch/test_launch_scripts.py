"""Every script in launch/ starts a tiny SFT run on CPU (2 processes where it launches ranks), bounded by a timeout.

Slurm is absent here: tests/launch/fake_slurm holds stand-ins for sbatch / srun / sacct / scontrol that run the
submitted work on this machine, so the real hydra-submitit-launcher plugin and launch/slurm.sbatch are exercised
as written (the plugin writes its sbatch submission file; the fake sbatch keeps a copy and runs it)."""

import json
import os
import re
import subprocess

import pytest
import yaml
from helpers import REPO, cli_env, posttrain_command

from posttrain.engine.distributed import free_port
from posttrain.logging import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

FAST = [
    "data.num_train=32",
    "data.num_eval=8",
    "logger.progress_bar=false",
    "train.max_steps=2",
    "train.micro_batch_size=4",
    "train.eval_at_start=false",
]
FAKE_SLURM = REPO / "tests" / "launch" / "fake_slurm"


def launch(script, *overrides, env=None, timeout=300):
    command = ["bash", str(REPO / "launch" / script), *overrides]
    result = subprocess.run(
        command, cwd=REPO, env={**cli_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    return result


def assert_two_rank_run(run_dir, result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == [1, 2]
    assert (run_dir / "checkpoints" / "step_2" / "rng_rank1.json").exists()  # a second rank took part
    assert (run_dir / "final" / "model.safetensors").exists()


def test_torchrun_script_starts_two_cpu_ranks(tmp_path):
    run_dir = tmp_path / "torchrun"
    result = launch("torchrun.sh", f"run_dir={run_dir}", *FAST, env={"NPROC": "2"})
    assert_two_rank_run(run_dir, result)


def test_deepspeed_script_starts_two_cpu_ranks_without_a_local_rank_flag(tmp_path):
    run_dir = tmp_path / "deepspeed"
    env = {"NPROC": "2", "MASTER_PORT": str(free_port())}
    result = launch("deepspeed.sh", f"run_dir={run_dir}", *FAST, env=env)
    assert_two_rank_run(run_dir, result)
    assert "--local_rank" not in (run_dir / "config.yaml").read_text()


def test_slurm_sbatch_runs_one_torchrun_per_node(tmp_path):
    run_dir = tmp_path / "slurm"
    env = {
        "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "7",
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
    }
    result = launch("slurm.sbatch", f"run_dir={run_dir}", *FAST, env=env)
    assert_two_rank_run(run_dir, result)


def test_local_sweep_runs_each_job_in_its_own_process_and_survives_a_failed_job(tmp_path):
    """Job 1 fails its config check; job 0 still trains, the sweep exits 1 and sweep.json says which failed."""
    root = tmp_path / "sweep"
    result = launch("sweep.sh", f"run_dir={root}", *FAST, "optim.lr=1e-3", "optim.warmup_ratio=0,2")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    pids = re.findall(r"posttrain sweep: job \d of 2 \(pid (\d+)\)", result.stdout)
    assert len(set(pids)) == 2 and str(os.getpid()) not in pids
    record = json.loads((root / "sweep.json").read_text())
    assert [(job["run_dir"], job["status"] == 0) for job in record] == [(f"{root}/0", True), (f"{root}/1", False)]
    assert record[1]["overrides"][-1] == "optim.warmup_ratio=2"
    assert (root / "0" / "final" / "model.safetensors").exists()
    assert "optim.warmup_ratio=2.0 must be in [0, 1]" in result.stderr


def test_slurm_sweep_goes_through_the_submitit_plugin_and_writes_its_submission(tmp_path):
    root, fake_dir = tmp_path / "sweep", tmp_path / "slurm"
    fake_dir.mkdir()
    env = {**cli_env(), "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(fake_dir)}
    hydra = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=1",
    ]
    command = posttrain_command("-m", *hydra, f"run_dir={root}", *FAST, "optim.lr=1e-3,3e-3")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    logs = "".join(path.read_text() for path in sorted(root.rglob("*.err")))
    assert result.returncode == 0, result.stderr[-3000:] + logs[-3000:]
    (submission,) = fake_dir.glob("submission_*.sh")
    text = submission.read_text()
    expected = ["--array=0-1%2", "--partition=debug", "--time=1440", "--ntasks-per-node=1"]
    assert all(f"#SBATCH {line}" in text for line in expected), text
    assert "submitit.core._submit" in text
    for job, lr in (("0", 1e-3), ("1", 3e-3)):
        config = yaml.safe_load((root / job / "config.yaml").read_text())
        assert (config["run_dir"], config["optim"]["lr"]) == (str(root / job), lr)
        assert (root / job / "final" / "model.safetensors").exists()


def test_a_submitit_job_of_two_tasks_trains_as_one_two_rank_run(tmp_path):
    """hydra/launcher=slurm runs one task per GPU; each task reads its rank from submitit's environment. Shown with
    submitit's local executor (the same job environment, no Slurm): 2 tasks, one 2-rank run."""
    root = tmp_path / "sweep"
    hydra = ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10"]
    command = posttrain_command("-m", *hydra, f"run_dir={root}", *FAST, "optim.lr=1e-3")
    result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    logs = "".join(path.read_text() for path in sorted(root.rglob("*.err")))
    assert_two_rank_run(root / "0", subprocess.CompletedProcess(command, result.returncode, logs, result.stderr))
