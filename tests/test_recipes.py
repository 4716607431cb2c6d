"""The Tülu 3 recipes in conf/recipe/ hold the published numbers of REFERENCE.md section 1."""

import pytest
from helpers import compose_config


def recipe(name, tmp_path):
    return compose_config([f"recipe={name}", f"run_dir={tmp_path}"])


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
    assert cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * 8 == 128


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
