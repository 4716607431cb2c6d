"""The Tülu 3 recipes in conf/recipe/ hold the published numbers of REFERENCE.md section 1."""

import pytest
from helpers import compose_config


def recipe(name, tmp_path):
    return compose_config([f"recipe={name}", f"run_dir={tmp_path}"])


def effective_batch(cfg) -> int:
    """Examples (pairs) per optimizer step, from the recipe's own fields."""
    train = cfg.train
    return train.micro_batch_size * train.gradient_accumulation_steps * train.assumed_world_size


# The published effective batch of each Tülu 3 recipe (REFERENCE.md section 1; Lambert et al. 2024).
PUBLISHED_EFFECTIVE_BATCH = {
    "tulu3_8b_sft": 128,
    "tulu3_70b_sft": 128,
    "tulu3_8b_dpo": 128,
    "tulu3_70b_dpo": 128,
    "tulu3_8b_rm": 256,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_EFFECTIVE_BATCH))
def test_recipe_effective_batch_is_the_published_one(tmp_path, name):
    cfg = recipe(name, tmp_path)
    assert cfg.train.assumed_world_size is not None, f"{name} must state the world size its batch assumes"
    assert effective_batch(cfg) == PUBLISHED_EFFECTIVE_BATCH[name]


def test_every_tulu3_recipe_states_its_world_size(tmp_path):
    from posttrain.cli import CONF_DIR

    names = sorted(path.stem for path in (CONF_DIR / "recipe").glob("tulu3_*.yaml") if path.stem != "tulu3_8b_pipeline")
    assert set(PUBLISHED_EFFECTIVE_BATCH) <= set(names)
    for name in names:
        cfg = recipe(name, tmp_path)
        assert cfg.train.assumed_world_size in (8, 64), name
        if cfg.algo.name == "rlvr":  # the rollout batch is split over the ranks
            assert cfg.algo.prompts_per_step % cfg.train.assumed_world_size == 0, name


def test_70b_sft_runs_on_64_ranks_with_accumulation_2(tmp_path):
    cfg = recipe("tulu3_70b_sft", tmp_path)
    assert (cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, cfg.train.assumed_world_size) == (
        1,
        2,
        64,
    )


def test_tulu3_rm_published_numbers(tmp_path):
    cfg = recipe("tulu3_8b_rm", tmp_path)
    assert (cfg.algo.name, cfg.algo.head, cfg.model.path) == ("rm", "bt", "allenai/Llama-3.1-Tulu-3-8B-SFT")
    assert (cfg.optim.lr, cfg.optim.scheduler, cfg.optim.max_grad_norm) == (3e-6, "linear", 1.0)
    assert (cfg.train.epochs, cfg.data.max_length, cfg.deepspeed.zero_stage) == (1, 2048, 3)


@pytest.mark.parametrize(
    "world, expected",
    [(8, None), (16, "effective batch 256; train.gradient_accumulation_steps=8 restores 128"), (3, "batch 48")],
)
def test_a_run_on_another_world_size_names_the_accumulation_that_restores_the_batch(tmp_path, world, expected):
    from posttrain.engine.backend import world_size_mismatch

    message = world_size_mismatch(recipe("tulu3_8b_sft", tmp_path).train, world)
    assert message == expected if expected is None else expected in message
    if world == 3:  # 128 is not a multiple of 3 ranks: no accumulation restores it, none is suggested
        assert "restores" not in message


@pytest.mark.parametrize(
    "name, base, lr, seed",
    [("tulu3_8b_sft", "meta-llama/Llama-3.1-8B", 5e-6, 123), ("tulu3_70b_sft", "meta-llama/Llama-3.1-70B", 2e-6, 456)],
)
def test_tulu3_sft(tmp_path, name, base, lr, seed):
    cfg = recipe(name, tmp_path)
    assert (cfg.algo.name, cfg.algo.loss_reduction, cfg.model.path, cfg.seed) == ("sft", "sum", base, seed)
    assert (cfg.optim.lr, cfg.optim.scheduler, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        lr,
        "linear",
        0.03,
        0.0,
    )
    assert (cfg.train.epochs, cfg.data.max_length, cfg.deepspeed.zero_stage) == (2, 4096, 3)
    assert effective_batch(cfg) == 128


def test_tulu31_rlvr_grpo(tmp_path):
    cfg = recipe("tulu3_8b_rlvr_grpo", tmp_path)
    algo = cfg.algo
    assert (algo.name, algo.kl_beta, algo.kl_estimator, algo.sampling.n, algo.prompts_per_step) == (
        "rlvr",
        0.01,
        "k3",
        16,
        48,
    )
    assert (algo.sampling.max_tokens, algo.sampling.temperature, algo.verification_reward) == (2048, 1.0, 10.0)
    assert (cfg.optim.lr, cfg.optim.scheduler) == (5e-7, "constant")


@pytest.mark.parametrize("name, beta, lr", [("tulu3_8b_rlvr", 0.05, 3e-7), ("tulu3_70b_rlvr", 0.07, 1e-7)])
def test_tulu3_rlvr_published_numbers(tmp_path, name, beta, lr):
    cfg = recipe(name, tmp_path)
    algo = cfg.algo
    assert (algo.kl_beta, cfg.optim.lr, algo.nonstop_penalty, algo.verification_reward) == (beta, lr, -10.0, 10.0)
    assert (algo.clip_low, algo.clip_high, algo.epochs_per_batch, algo.sampling.max_tokens) == (0.2, 0.2, 4, 2048)


def test_tulu3_pipeline_chains_the_8b_recipes(tmp_path):
    cfg = recipe("tulu3_8b_pipeline", tmp_path)
    assert [list(stage.overrides) for stage in cfg.algo.stages] == [
        ["recipe=tulu3_8b_sft"],
        ["recipe=tulu3_8b_dpo"],
        ["recipe=tulu3_8b_rlvr_grpo"],
    ]
    assert list(cfg.algo.launcher) == ["torchrun", "--nproc_per_node=8"]


@pytest.mark.parametrize("seed", [0, 1, None])  # None: every sequence at the full 4096 tokens
def test_grpo_recipe_bounds_its_largest_forward(tmp_path, seed):
    """Per rank the 8B GRPO update is 48 prompts / 8 ranks x 16 samples = 96 sequences of up to 2048 prompt +
    2048 completion tokens, one packed forward of up to 393,216 tokens without a budget. Under the recipe's
    train.max_tokens_per_micro_batch every forward holds at most that many tokens and every sequence trains once."""
    import random

    from posttrain.data.batching import split_evenly
    from posttrain.training import step_micro_batches

    cfg = recipe("tulu3_8b_rlvr_grpo", tmp_path)
    budget = cfg.train.max_tokens_per_micro_batch
    sequences = cfg.algo.prompts_per_step // cfg.train.assumed_world_size * cfg.algo.sampling.n
    longest = cfg.data.max_length + cfg.algo.sampling.max_tokens
    assert (sequences, longest, budget) == (96, 4096, 16384)
    lengths = [longest] * sequences if seed is None else [random.Random(seed).randint(100, longest) for _ in range(96)]
    fixed = split_evenly(list(range(sequences)), cfg.train.gradient_accumulation_steps)
    assert max(sum(lengths[i] for i in batch) for batch in fixed) > budget  # the unbounded forward of today
    micro_batches = step_micro_batches(fixed, lambda i: (lengths[i],), budget, padded=False)
    assert sorted(i for batch in micro_batches for i in batch) == list(range(sequences))
    assert max(sum(lengths[i] for i in batch) for batch in micro_batches) <= budget
    if seed is None:
        assert len(micro_batches) == 24  # 4 full-length sequences a forward


def test_tulu3_recipes_fit_their_longest_sequence_in_the_token_budget(tmp_path):
    """Every Tülu 3 trainer recipe sets a budget that holds its longest example (pair: both sequences)."""
    for name, longest in {
        "tulu3_8b_sft": 4096,
        "tulu3_70b_sft": 4096,
        "tulu3_8b_dpo": 2 * 2048,
        "tulu3_70b_dpo": 2 * 2048,
        "tulu3_8b_rm": 2 * 2048,
        "tulu3_8b_rlvr_grpo": 2048 + 2048,
        "tulu3_8b_rlvr": 2048 + 2048,
        "tulu3_70b_rlvr": 2048 + 2048,
    }.items():
        budget = recipe(name, tmp_path).train.max_tokens_per_micro_batch
        assert budget is not None and budget >= longest, name
