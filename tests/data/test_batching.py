"""Step plans: deterministic, disjoint within an epoch, independent of the micro-batch split."""

import pytest

from posttrain.data.batching import StepPlan


def test_steps_cover_an_epoch_without_repeats():
    plan = StepPlan(micro_batch_size=4, gradient_accumulation_steps=2, world_size=1, num_examples=40, seed=3)
    seen = [i for step in range(plan.steps_per_epoch) for i in plan.step_indices(step)]
    assert sorted(seen) == list(range(40))
    assert plan.step_indices(plan.steps_per_epoch) != plan.step_indices(0)  # a new epoch reshuffles


def test_same_examples_per_step_whatever_the_split():
    a = StepPlan(1, 8, 1, 64, seed=0)
    b = StepPlan(8, 1, 1, 64, seed=0)
    c = StepPlan(2, 2, 2, 64, seed=0)
    for step in range(3):
        assert a.step_indices(step) == b.step_indices(step) == c.step_indices(step)
        # Ranks' micro-batches partition the step.
        parts = [i for rank in range(2) for mb in c.micro_batches(step, rank) for i in mb]
        assert sorted(parts) == sorted(c.step_indices(step))


def test_too_few_examples_for_one_step():
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        StepPlan(8, 2, 1, 10, seed=0).step_indices(0)
