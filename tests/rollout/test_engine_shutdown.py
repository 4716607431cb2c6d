"""An in-process vLLM engine shut down (closed, or collected unclosed) leaves torch.distributed's world to the trainer.

vLLM's engine shut-down ends with `torch.distributed.destroy_process_group()`; unguarded, it ended the world that
posttrain started and with it DeepSpeed's cached clone of the world group, and the next DeepSpeed engine in the
process failed with "Group ... is not registered" (two trainers with vLLM rollouts in one process: a sweep in one
process, a notebook, the isolated test files in one pytest run). Each engine here is its own, so the check runs in
a fresh interpreter: closing an engine ends vLLM's per-process groups, which the session's shared engine uses.
"""

import pytest
from helpers import REPO, run_python

pytestmark = pytest.mark.integration

SHUTDOWNS = """
import gc, json, os, tempfile
from pathlib import Path

os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", DS_ACCELERATOR="cpu")
import torch
import torch.distributed as dist
from vllm import LLM  # imported before the engines start, as in a process that already sampled (see below)
from deepspeed.utils import groups
from vllm.distributed.parallel_state import model_parallel_is_initialized

from posttrain.engine.distributed import init_distributed
from posttrain.models.tokenizer import train_tokenizer
from posttrain.rollout import SamplingConfig, build_rollout_service
from rollout_helpers import TEST_ROLLOUT_CONFIG, save_policy_dir, tiny_policy

tokenizer = train_tokenizer([f"{a} + {b} = {a + b}" for a in range(40) for b in range(40)], vocab_size=300)
model_dir = save_policy_dir(tiny_policy(tokenizer), tokenizer, Path(tempfile.mkdtemp()))
init_distributed()
world_clone = groups._clone_world_group()  # what a DeepSpeed engine keeps for the next ones in the process


def registered(group):
    try:
        return dist.get_global_rank(group, 0) == 0
    except ValueError:  # "Group ... is not registered"
        return False


states = {}
for how in ("collect", "close"):  # the second engine starts after the first one's shut-down
    service = build_rollout_service(TEST_ROLLOUT_CONFIG, model_dir, tokenizer)
    completions = service.generate([[5, 6, 7]], SamplingConfig(max_tokens=4))
    if how == "collect":
        # An engine whose start first imports vllm.LLM stays referenced from the frames of that import (hence the
        # import above): this one is collected at once.
        del service
        gc.collect()
    else:
        service.close()
        service.close()  # idempotent
    states[how] = {
        "generated": len(completions),
        "engine_shut_down": not model_parallel_is_initialized(),
        "world": dist.is_initialized(),
        "deepspeed_world_clone": registered(world_clone),
    }
import deepspeed

deepspeed.initialize(model=torch.nn.Linear(4, 4), config={"train_micro_batch_size_per_gpu": 1})
print(json.dumps(states))
"""


def test_engine_shutdowns_keep_the_trainers_process_group_and_deepspeed_starts_after_them():
    states = run_python(SHUTDOWNS, {"PYTHONPATH": str(REPO / "tests")})  # any failure (DeepSpeed's) fails run_python
    expected = {"generated": 1, "engine_shut_down": True, "world": True, "deepspeed_world_clone": True}
    assert states == {"collect": expected, "close": expected}
