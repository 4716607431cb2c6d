"""How `posttrain -m` is routed and expanded (no processes started): plain sweeps run job by job in their own
processes (posttrain/sweep.py), sweeps naming a Hydra launcher go to Hydra; the DeepSpeed launcher's
--local_rank never reaches Hydra."""

import pytest

from posttrain.cli import strip_local_rank
from posttrain.sweep import is_local_sweep, sweep_jobs, sweep_root


@pytest.mark.parametrize(
    "argv, local",
    [
        (["-m", "optim.lr=1e-4,3e-4"], True),
        (["--multirun", "algo=sft", "train.epochs=1,2"], True),
        (["optim.lr=1e-4"], False),  # no sweep flag: a single run
        (["-m", "hydra/launcher=slurm", "optim.lr=1e-4,3e-4"], False),  # Hydra's submitit plugin
        (["-m", "hydra.launcher.partition=gpu", "optim.lr=1,2"], False),
        (["-m", "--cfg", "job", "optim.lr=1,2"], False),  # Hydra's own flags stay Hydra's
    ],
)
def test_which_sweeps_posttrain_runs_itself(argv, local):
    assert is_local_sweep(argv) is local


def test_jobs_are_hydras_cartesian_product_in_hydras_order():
    jobs = sweep_jobs(["algo=sft,rm", "data=jsonl", "train.epochs=range(1,3)"])
    assert jobs == [
        ["algo=sft", "data=jsonl", "train.epochs=1"],
        ["algo=sft", "data=jsonl", "train.epochs=2"],
        ["algo=rm", "data=jsonl", "train.epochs=1"],
        ["algo=rm", "data=jsonl", "train.epochs=2"],
    ]
    assert sweep_jobs(["optim.lr=1e-4,3e-4"]) == [["optim.lr=0.0001"], ["optim.lr=0.0003"]]  # Hydra's own spelling


def test_sweep_root_is_the_run_dir_override_or_the_configs_default(tmp_path):
    assert str(sweep_root(["optim.lr=1", f"run_dir={tmp_path}/lr"])) == f"{tmp_path}/lr"
    default = sweep_root(["algo=rm"])
    assert default.parts[:2] == ("runs", "rm") and len(default.parts) == 3  # runs/rm/<date-time>


@pytest.mark.parametrize(
    "argv", [["--local_rank=3", "algo=sft"], ["algo=sft", "--local_rank", "3"], ["--local-rank=3", "algo=sft"]]
)
def test_the_deepspeed_launchers_local_rank_flag_becomes_the_env(monkeypatch, argv):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(argv) == ["algo=sft"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"
