"""ZeRO-3 weight sync of parameters larger than the bucket: assembled from the ranks' flat partitions a chunk at a
time (2 CPU processes, gloo), equal to the unpartitioned model's tensors, plain and LoRA-merged
(zero3_chunks_script.py). No vLLM: it checks what the sync hands any engine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_env, free_port

SCRIPT = Path(__file__).with_name("zero3_chunks_script.py")


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["full", "lora"])
def test_large_parameters_assembled_in_chunks_equal_the_whole_model(tmp_path, case):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command += [str(SCRIPT), str(tmp_path)]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())[case]
        assert results["names_equal"], rank
        assert all(results["equal"].values()), [name for name, same in results["equal"].items() if not same]
        assert results["assembled"] >= 10  # the matrices took the chunked path (norms fit in a bucket)
