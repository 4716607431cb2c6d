"""Compose posttrain configs and run the `posttrain` command in a subprocess, as a user would.

(Not in conftest.py: test folders have their own conftest.py, so `import conftest` is ambiguous.)
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cli_env() -> dict:
    # A fresh process: no distributed settings inherited from in-process runs of this test session.
    launcher_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items() if key not in launcher_keys}
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
