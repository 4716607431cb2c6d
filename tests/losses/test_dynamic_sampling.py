"""Dynamic sampling: informative groups, oversampling rounds until the step is full, rank agreement."""

import threading

import pytest
import torch

from posttrain.losses.dynamic_sampling import (
    allocate_groups,
    collect_groups,
    dynamic_sampling_problems,
    extra_prompt_indices,
    extra_round_size,
    informative_groups,
)

G = 4


def scripted_rollout(informative: set[int], calls: list):
    """A fake sampler: prompt i's group has rewards [0, 1, 0, 1] if i is in `informative`, else [1, 1, 1, 1]."""

    def rollout(indices):
        calls.append(list(indices))
        rows = [[0.0, 1.0] * (G // 2) if i in informative else [1.0] * G for i in indices]
        return list(indices), torch.tensor(rows).view(len(indices), G)

    return rollout


def single_rank_sum(values):
    return list(values)


def draw_from(pool_size, seed=0, update=0):
    return lambda extra_round, per_rank: extra_prompt_indices(pool_size, per_rank, seed, update, extra_round, 0, 1)


def trained_prompts(rounds):
    return [p for r in rounds for p, keep in zip(r.payload, r.keep.tolist()) if keep]


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.1], [10.0, 0.0, 0.0]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]


def test_round_sizes_and_allocation():
    assert extra_round_size(5, 1.5, 2) == 4  # ceil(7.5) = 8 over 2 ranks
    assert extra_round_size(3, 1.0, 1) == 3
    assert extra_round_size(1, 1.0, 4) == 1  # at least one prompt per rank
    assert allocate_groups([5, 1, 3], 6) == [3, 1, 2]
    assert allocate_groups([2, 2], 8) == [2, 2]  # fewer than the target: keep all
    assert allocate_groups([0, 7], 3) == [0, 3]


def test_extra_prompts_are_deterministic_and_split_across_ranks():
    first = [extra_prompt_indices(10, 3, seed=1, update=4, extra_round=1, rank=r, world_size=2) for r in range(2)]
    again = [extra_prompt_indices(10, 3, seed=1, update=4, extra_round=1, rank=r, world_size=2) for r in range(2)]
    assert first == again and len(set(first[0] + first[1])) == 6  # one permutation, disjoint blocks
    assert extra_prompt_indices(10, 3, 1, 4, 2, 0, 1) != first[0]  # the next round draws other prompts
    assert len(extra_prompt_indices(3, 5, 0, 0, 1, 0, 1)) == 5  # more than the data set: cycles


def test_oversampling_fills_the_step_when_half_the_groups_are_flat():
    """8 prompts a step, half of every batch flat (odd prompts informative among 64): round 0 gives 4 informative
    groups; extra rounds draw ceil(deficit x 1.0) prompts until 8 are informative; the step trains on exactly 8."""
    calls = []
    rollout = scripted_rollout(set(range(1, 64, 2)), calls)
    rounds, stats = collect_groups(
        rollout, list(range(8)), draw_from(64), single_rank_sum,
        mode="oversample", target=8, max_extra_rounds=10, oversample_factor=1.0,
    )  # fmt: skip
    trained = trained_prompts(rounds)
    assert len(trained) == 8 and all(p % 2 == 1 for p in trained)
    assert len(calls) == len(rounds) == stats["extra_rounds"] + 1 >= 2
    assert len(calls[1]) == 4  # the first extra round asks for the 4 missing groups
    assert stats["groups_kept"] == 8 and stats["groups_sampled"] == sum(len(c) for c in calls)
    assert stats["groups_dropped"] == stats["groups_sampled"] - 8


def test_oversampling_stops_after_the_extra_rounds_when_the_data_has_no_more():
    """Only prompts 0-3 are informative: after round 0 (4 of 8) every extra round finds none; the step stops after
    max_extra_rounds = 3 extra rounds and trains on the 4 it has."""
    calls = []
    rollout = scripted_rollout({0, 1, 2, 3}, calls)
    rounds, stats = collect_groups(
        rollout, list(range(8)), lambda extra_round, per_rank: list(range(100, 100 + per_rank)), single_rank_sum,
        mode="oversample", target=8, max_extra_rounds=3, oversample_factor=2.0,
    )  # fmt: skip
    assert len(calls) == 4 and stats["extra_rounds"] == 3
    assert [len(c) for c in calls] == [8, 8, 8, 8]  # deficit 4 x factor 2
    assert sorted(trained_prompts(rounds)) == [0, 1, 2, 3] and stats["groups_kept"] == 4
    assert stats["groups_dropped"] == 32 - 4


def test_surplus_is_trimmed_in_draw_order():
    """Round 0 has 2 of 4 informative, the extra round (deficit 2 x factor 3 = 6 prompts) 6: keep 2 + the first 2."""
    calls = []
    rollout = scripted_rollout({0, 1} | set(range(10, 16)), calls)
    rounds, stats = collect_groups(
        rollout, [0, 1, 2, 3], lambda extra_round, per_rank: list(range(10, 10 + per_rank)), single_rank_sum,
        mode="oversample", target=4, max_extra_rounds=2, oversample_factor=3.0,
    )  # fmt: skip
    assert trained_prompts(rounds) == [0, 1, 10, 11] and stats["extra_rounds"] == 1


@pytest.mark.parametrize("mode, trained", [("filter", [1, 3]), ("off", [0, 1, 2, 3])])
def test_filter_and_off_use_one_round(mode, trained):
    calls = []
    rounds, stats = collect_groups(
        scripted_rollout({1, 3}, calls), [0, 1, 2, 3], draw_from(64), single_rank_sum,
        mode=mode, target=4, max_extra_rounds=5, oversample_factor=1.0,
    )  # fmt: skip
    assert len(calls) == 1 and trained_prompts(rounds) == trained
    assert stats["extra_rounds"] == 0 and stats["groups_kept"] == len(trained)


def test_two_ranks_agree_on_rounds_and_train_on_the_target_together():
    """Two ranks in threads sharing a summing all-reduce. Rank 0's prompts are all informative, rank 1's flat but
    for prompt 101: the ranks must run the same number of rounds of the same size (a collective would deadlock
    otherwise) and keep 6 groups between them, whichever rank found them."""
    barrier, slots, lock = threading.Barrier(2), {}, threading.Lock()

    def make_all_reduce(rank):
        def all_reduce(values):
            with lock:
                slots[rank] = list(values)
            barrier.wait()
            total = [sum(column) for column in zip(slots[0], slots[1])]
            barrier.wait()
            return total

        return all_reduce

    results, calls = {}, {0: [], 1: []}
    informative = {0: set(range(0, 50)), 1: {101}}
    first = {0: [0, 1], 1: [100, 101]}

    def run(rank):
        draw = lambda extra_round, per_rank: [rank * 100 + 10 * extra_round + i for i in range(per_rank)]  # noqa: E731
        results[rank] = collect_groups(
            scripted_rollout(informative[rank], calls[rank]), first[rank], draw, make_all_reduce(rank),
            mode="oversample", target=6, max_extra_rounds=4, oversample_factor=1.0, rank=rank, world_size=2,
        )  # fmt: skip

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # round 0: 2 + 1 informative, deficit 3 -> 2 prompts per rank; round 1: 2 + 0, deficit 1 -> 1 per rank;
    # round 2: 1 + 0 -> 6 in all, stop.
    assert [len(c) for c in calls[0]] == [len(c) for c in calls[1]] == [2, 2, 1]
    assert [len(trained_prompts(results[r][0])) for r in range(2)] == [5, 1]
    assert results[0][1] == results[1][1] and results[0][1]["groups_kept"] == 6
    assert results[0][1]["groups_sampled"] == 10 and results[0][1]["extra_rounds"] == 2


def test_config_problems():
    assert dynamic_sampling_problems("oversample", 2, 1.5) == []
    assert dynamic_sampling_problems("resample", 2, 1.0) == [
        "algo.dynamic_sampling='resample' must be one of off, filter, oversample"
    ]
    problems = dynamic_sampling_problems("oversample", -1, 0.5)
    assert problems[0].startswith("algo.max_extra_rounds=-1 must be >= 0")
    assert problems[1].startswith("algo.oversample_factor=0.5 must be >= 1")
