"""The dynamic reference refresh (`refresh_reference`, RLVR's algo.reference_refresh_every) under ZeRO-2 and
ZeRO-3 with 2 CPU processes: the reference's gathered weights equal the policy's afterwards, and a reference
saved into a checkpoint and restored equals it too (see reference_refresh_script.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.engine.distributed import free_port

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

SCRIPT = Path(__file__).with_name("reference_refresh_script.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("reference_refresh")
    launcher_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items() if key not in launcher_keys}
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(SCRIPT), str(out_dir),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_refresh_copies_the_policy_into_the_reference_on_every_rank(rank_results, stage):
    for rank, results in enumerate(rank_results):
        result = results[stage]
        assert result["before"] > 1e-3, f"rank {rank}: training left the policy equal to the reference"
        assert result["after"] == 0.0, f"rank {rank}: the refreshed reference differs from the policy"


def test_zero3_reference_is_partitioned(rank_results):
    for results in rank_results:
        assert results["zero3"]["reference_local_numel"] < results["zero3"]["policy_numel"] / 2 + 1000
        assert results["zero2"]["reference_local_numel"] == results["zero2"]["policy_numel"]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_saved_reference_restores_into_a_fresh_reference(rank_results, stage):
    for rank, results in enumerate(rank_results):
        result = results[stage]
        assert result["checkpoint_files"] == ["reference.safetensors"]
        assert result["restored_before"] > 1e-3 and result["restored_found"]
        assert result["restored_after"] == 0.0, f"rank {rank}: the restored reference differs from the policy"
