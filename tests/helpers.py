"""Helpers every test folder shares: compose configs and run `posttrain` as a user would, free ports, tensors.

(Not in conftest.py: test folders have their own conftest.py, so `import conftest` is ambiguous.)
"""

import json
import os
import subprocess
import sys
import textwrap
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


def wandb_offline_config(run_dir: Path) -> dict:
    """The config recorded in the newest offline wandb run under `run_dir`, read back from its `.wandb` file.

    The file is a LevelDB-style log (a 7-byte ":W&B" header, then 32 KiB blocks of records with a 7-byte header:
    crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of wandb's protobuf `Record`s; config values
    arrive as JSON in the run record and in config records."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    path = sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb"))[-1]
    data, block, position, pieces, records = path.read_bytes(), 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block trailer or padding
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            records.append(pieces)
    config = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        updates = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    return config


def run_python(code: str, extra_env: dict[str, str] | None = None) -> dict:
    """Runs `code` (dedented) in a fresh interpreter with the repo on PYTHONPATH; its last stdout line must be JSON.
    Like `cli_env`, it inherits no distributed settings (an in-process run of this session set them for its own world
    of one: its MASTER_PORT is taken)."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_KEYS}
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


# Prepended to a `run_python` memory probe: peak_extra_bytes(function) is the peak resident set (VmHWM) a call
# reaches above the RSS before it, after one warm-up call. Run with MALLOC_MMAP_THRESHOLD_ low, so freed blocks
# leave the RSS at once.
PEAK_EXTRA_BYTES = """\
import re
from pathlib import Path

def resident_kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

def peak_extra_bytes(function):
    function()  # warm-up: thread pools, BLAS buffers
    baseline = resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    function()
    return (resident_kib("VmHWM") - baseline) * 1024
"""
