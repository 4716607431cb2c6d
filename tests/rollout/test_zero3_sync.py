"""ZeRO-3 (full fine-tuning and LoRA) under torchrun with 2 CPU processes: every rank's vLLM engine
takes the gathered weights and then equals transformers on them (see zero3_sync_script.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.vllm]

SCRIPT = Path(__file__).with_name("zero3_sync_script.py")
REPO = Path(__file__).resolve().parents[2]
LOGPROB_ATOL = 1e-4  # float32 on both sides; see test_vllm_sync


def clean_env() -> dict:
    launcher_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items() if key not in launcher_keys}
    env.update(
        DS_ACCELERATOR="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO)
    )
    return env


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("zero3_sync")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(SCRIPT),
        str(out_dir),
    ]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("phase", ["zero3", "lora"])
def test_zero3_sync_on_every_rank(rank_results, phase):
    for rank, results in enumerate(rank_results):
        before, after = results[phase]["before"], results[phase]["after"]
        assert not all(before["equal"]), f"rank {rank}: the engine already matched before the sync"
        assert before["max_logprob_gap"] > 0.1
        assert all(after["equal"]) and len(after["equal"]) == 3, f"rank {rank}: {after}"
        assert after["max_logprob_gap"] < LOGPROB_ATOL
