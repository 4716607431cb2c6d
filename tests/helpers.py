"""Helpers every test folder shares: compose configs and run `posttrain` as a user would, free ports, tensors.

(Not in conftest.py: test folders have their own conftest.py, so `import conftest` is ambiguous.)
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from posttrain.engine.distributed import free_port  # noqa: F401  (re-exported: the one free-port helper)

REPO = Path(__file__).resolve().parent.parent


LAUNCHER_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def t(*rows, requires_grad=False) -> torch.Tensor:
    """A float64 tensor of `rows` (numbers, or lists of numbers): hand-derived test values."""
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def cli_env() -> dict:
    # A fresh process: no distributed settings inherited from in-process runs of this test session.
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_KEYS}
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    return env


def posttrain_command(*overrides) -> list[str]:
    return [sys.executable, "-m", "posttrain", *overrides]


def run_posttrain(*overrides, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        posttrain_command(*overrides), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def compose_config(overrides: list[str]):
    """The composed posttrain config for `overrides` (as the CLI would build it)."""
    from hydra import compose, initialize_config_dir

    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides)
