"""posttrain.training: the token-budget settings are checked before anything runs; step_micro_batches."""

import pytest
from helpers import compose_config

from posttrain.errors import ConfigError
from posttrain.trainers import rlvr
from posttrain.training import shared_config_problems, step_micro_batches


def test_a_budget_below_data_max_length_is_a_config_problem(tmp_path):
    cfg = compose_config([f"run_dir={tmp_path}", "data.max_length=128", "train.max_tokens_per_micro_batch=100"])
    (problem,) = [p for p in shared_config_problems(cfg) if "max_tokens_per_micro_batch" in p]
    assert "train.max_tokens_per_micro_batch=100 is below data.max_length=128" in problem
    cfg = compose_config([f"run_dir={tmp_path}", "data.max_length=128", "train.max_tokens_per_micro_batch=128"])
    assert not shared_config_problems(cfg)
    assert compose_config([f"run_dir={tmp_path}"]).train.max_tokens_per_micro_batch is None  # the default


def test_rlvr_budget_must_hold_a_prompt_and_its_completion(tmp_path):
    common = [f"run_dir={tmp_path}", "algo=rlvr", "data.max_length=128", "algo.sampling.max_tokens=64"]
    with pytest.raises(ConfigError, match=r"below data.max_length \+ algo.sampling.max_tokens \(prompt \+ completion"):
        rlvr.check_config(compose_config([*common, "train.max_tokens_per_micro_batch=191"]))
    rlvr.check_config(compose_config([*common, "train.max_tokens_per_micro_batch=192"]))


def test_step_micro_batches_without_a_budget_are_the_fixed_ones():
    fixed = [[3, 1], [0, 2]]
    assert step_micro_batches(fixed, lambda i: (10,), None, padded=False) is fixed
    # With one: the same items re-packed (sizes 10 each, budget 25: two a micro-batch, input order kept).
    assert step_micro_batches(fixed, lambda i: (10,), 25, padded=False) == [[3, 1], [0, 2]]
    assert step_micro_batches(fixed, lambda i: (10,), 35, padded=False) == [[3, 1, 0], [2]]


def test_micro_steps_pad_a_short_rank_with_zero_weight_steps_and_set_one_boundary(monkeypatch):
    """Another rank has 3 micro-batches, this one 2: the third micro-step re-runs this rank's first item with
    weight 0, and DeepSpeed's accumulation boundary is true on the third (last) micro-step only."""
    from posttrain import training

    class BoundaryEngine:
        def __init__(self):
            self.boundaries = []

        def set_gradient_accumulation_boundary(self, is_boundary):
            self.boundaries.append(is_boundary)

    monkeypatch.setattr(training, "all_reduce_max", lambda values: [max(values[0], 3.0)])
    engine = BoundaryEngine()
    steps = list(training.micro_steps(engine, [["a", "b"], ["c"]]))
    assert steps == [(["a", "b"], 1.0), (["c"], 1.0), (["a"], 0.0)]
    assert engine.boundaries == [False, False, True]
    # A rank with no item at all gets (None, 0) each time: the trainer runs idle_micro_step.
    engine = BoundaryEngine()
    assert list(training.micro_steps(engine, [[], []])) == [(None, 0.0)] * 3
    assert engine.boundaries == [False, False, True]


def test_run_algorithm_closes_the_trainers_rollout_also_when_the_run_fails(tmp_path, monkeypatch):
    """A trainer's rollout engine is shut down when its run ends, not when the garbage collector gets to it."""
    from posttrain import trainers, training

    closed = []

    class Rollout:
        def close(self):
            closed.append(True)

    class Trainer:
        def __init__(self, run):
            self.rollout = Rollout()

    def failing_loop(run, trainer):
        raise RuntimeError("step failed")

    sft = trainers.get_algorithm("sft")
    fake = trainers.Algorithm("fake", schema=sft.schema, entry=Trainer, curve=("loss",), check=None)
    monkeypatch.setattr(trainers, "get_algorithm", lambda name: fake)
    monkeypatch.setattr(training, "run_loop", failing_loop)
    with pytest.raises(RuntimeError, match="step failed"):
        training.run_algorithm(compose_config([f"run_dir={tmp_path / 'run'}"]))
    assert closed == [True]
