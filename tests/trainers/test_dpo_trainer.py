"""DPO trainer: cached vs live reference, cache reuse and keys, the loss family, recipes, and SFT -> DPO end to end."""

import pytest
import torch
from helpers import compose_config

from posttrain.engine import reference as reference_module
from posttrain.logging import read_metrics
from posttrain.models import reference as pair_reference
from posttrain.trainers import dpo
from posttrain.training import run_algorithm

FAST = [
    "algo=dpo",
    "data=arithmetic_preference",
    "data.num_train=48",
    "data.num_eval=16",
    "logger.progress_bar=false",
    "train.micro_batch_size=8",
    "train.max_steps=3",
    "optim.lr=1e-2",
    "optim.warmup_ratio=0",
    "algo.reference.micro_batch_size=5",
]
STEP_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
    "nll",
    "lr",
    "grad_norm",
    "tokens_per_second",
)


def run_dpo(run_dir, cache_dir, *overrides):
    cfg = compose_config([f"run_dir={run_dir}", f"algo.reference.cache_dir={cache_dir}", *FAST, *overrides])
    return run_algorithm(cfg)


def step_losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


class ForwardCounter:
    """Counts reference-model builds and reference precompute passes (monkeypatched into the trainer)."""

    def __init__(self, monkeypatch):
        self.builds, self.passes = 0, 0
        build, compute = pair_reference.reference_model, pair_reference.compute_reference_logprobs

        def counted_build(*args, **kwargs):
            self.builds += 1
            return build(*args, **kwargs)

        def counted_compute(*args, **kwargs):
            self.passes += 1
            return compute(*args, **kwargs)

        monkeypatch.setattr(pair_reference, "reference_model", counted_build)
        monkeypatch.setattr(pair_reference, "compute_reference_logprobs", counted_compute)


@pytest.mark.integration
def test_cached_reference_trains_exactly_like_a_live_reference(tmp_path, monkeypatch):
    counter = ForwardCounter(monkeypatch)
    cached = run_dpo(tmp_path / "cached", tmp_path / "cache")
    assert (counter.builds, counter.passes) == (1, 2)  # one model, one pass per split (train, eval)
    live = run_dpo(tmp_path / "live", tmp_path / "unused", "algo.reference.cache=false")
    assert not (tmp_path / "unused").exists()
    cached_metrics = [m for m in read_metrics(cached) if "loss" in m]
    live_metrics = [m for m in read_metrics(live) if "loss" in m]
    assert len(cached_metrics) == 3
    for a, b in zip(cached_metrics, live_metrics):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert step_losses(cached)[-1] != step_losses(cached)[0]  # the policy did move
    eval_cached, eval_live = read_metrics(cached)[-1], read_metrics(live)[-1]
    assert eval_cached["eval_loss"] == pytest.approx(eval_live["eval_loss"], rel=1e-6)


@pytest.mark.integration
def test_second_run_reuses_the_cache_without_building_the_reference(tmp_path, monkeypatch):
    first = run_dpo(tmp_path / "first", tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and eval
    counter = ForwardCounter(monkeypatch)
    second = run_dpo(tmp_path / "second", tmp_path / "cache")
    assert (counter.builds, counter.passes) == (0, 0)
    assert step_losses(second) == step_losses(first)
    # A change that alters the reference numbers misses the cache and computes again.
    run_dpo(tmp_path / "third", tmp_path / "cache", "data.max_length=100", "data.num_train=40")
    assert (counter.builds, counter.passes) == (1, 2)


def _examples(tokenizer, count=8, **data):
    from data_recipes import generate_task
    from posttrain.config import DataConfig
    from posttrain.data.preference import build_preference_examples
    from posttrain.data.sources import SourceRow

    rows = [
        SourceRow("g", i, row) for i, row in enumerate(generate_task("arithmetic_preference", "train", count, seed=0))
    ]
    return build_preference_examples(rows, tokenizer, DataConfig(**{"max_length": 128, **data}), "train")[0]


def test_cache_key_covers_model_data_template_and_length(tiny_tokenizer, tmp_path):
    import copy

    base = dict(
        model={"tiny": {"hidden_size": 128}, "seed": 0},
        examples=_examples(tiny_tokenizer),
        tokenizer=tiny_tokenizer,
        max_length=128,
        truncation="error",
        dtype="float32",
        fused=True,
    )
    key = reference_module.reference_cache_key(**base)
    assert key == reference_module.reference_cache_key(**base)
    retemplated = copy.deepcopy(tiny_tokenizer)
    retemplated.chat_template = tiny_tokenizer.chat_template.replace("\n", " ")
    assert retemplated.chat_template != tiny_tokenizer.chat_template
    changes = {
        "model": {"tiny": {"hidden_size": 128}, "seed": 1},
        "examples": _examples(tiny_tokenizer, count=9),
        "tokenizer": retemplated,
        "max_length": 64,
        "dtype": "bfloat16",
        "fused": False,
    }
    for name, value in changes.items():
        assert reference_module.reference_cache_key(**{**base, name: value}) != key, name
    # A rewritten weight file changes a directory's fingerprint without reading the weights.
    (tmp_path / "model.safetensors").write_bytes(b"a")
    before = reference_module.directory_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"bb")
    assert reference_module.directory_fingerprint(tmp_path) != before


@pytest.mark.integration
def test_reference_free_simpo_builds_no_reference(tmp_path, monkeypatch):
    counter = ForwardCounter(monkeypatch)
    run_dir = run_dpo(
        tmp_path / "simpo",
        tmp_path / "cache",
        "algo.loss=simpo",
        "algo.beta=2.0",
        "+algo.loss_kwargs.gamma_beta_ratio=0.5",
    )
    assert (counter.builds, counter.passes) == (0, 0) and not (tmp_path / "cache").exists()
    metrics = [m for m in read_metrics(run_dir) if "loss" in m]
    assert all(key in metrics[-1] for key in STEP_KEYS)
    assert metrics[0]["rewards/margin"] != 0.0  # reference-free: the margin is the policy's own from step 1


@pytest.mark.integration
@pytest.mark.parametrize("loss", ["dpo_norm", "ipo", "hinge", "wpo"])
def test_every_family_loss_trains_and_logs_the_reward_metrics(tmp_path, loss):
    run_dir = run_dpo(tmp_path / loss, tmp_path / "cache", f"algo.loss={loss}", "train.max_steps=2")
    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(isinstance(steps[-1][key], float) for key in STEP_KEYS)
    assert metrics[0]["step"] == 0 and metrics[0]["eval_accuracy"] == 0.5  # policy = reference: all ties
    assert (run_dir / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_nll_alpha_adds_the_chosen_nll_to_any_family_loss(loss):
    """RPO: loss = family loss + alpha * chosen NLL; the family's reward metrics are unchanged."""
    from types import SimpleNamespace

    from posttrain.losses.dpo import chosen_nll

    inputs = (
        torch.tensor([-4.0, -9.0]),
        torch.tensor([-6.0, -8.0]),
        torch.tensor([-5.0, -9.5]),
        torch.tensor([-5.5, -7.0]),
        torch.tensor([2, 3]),
        torch.tensor([3, 2]),
    )

    def loss_with(alpha):
        algo = SimpleNamespace(loss=loss, beta=2.0, label_smoothing=0.0, loss_kwargs={}, nll_alpha=alpha)
        return dpo.DPO.family_loss(SimpleNamespace(cfg=SimpleNamespace(algo=algo)), inputs)

    (plain, plain_metrics), (rpo, rpo_metrics) = loss_with(0.0), loss_with(0.5)
    nll = chosen_nll(inputs[0], inputs[4])
    assert nll.item() == pytest.approx((2.0 + 3.0) / 2)
    assert rpo.item() == pytest.approx(plain.item() + 0.5 * nll.item())
    assert rpo_metrics["loss"].item() == pytest.approx(rpo.item())
    assert rpo_metrics["rewards/margin"] == plain_metrics["rewards/margin"]
    assert rpo_metrics["logps/chosen"].item() == pytest.approx(-2.5)
    assert rpo_metrics["logps/rejected"].item() == pytest.approx((-2.0 - 4.0) / 2)


def test_negative_nll_alpha_fails_before_anything_is_written(tmp_path):
    from posttrain.errors import ConfigError

    cfg = compose_config([f"run_dir={tmp_path / 'run'}", *FAST, "algo.nll_alpha=-1"])
    with pytest.raises(ConfigError, match="algo.nll_alpha=-1.0 is negative"):
        run_algorithm(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_unknown_loss_fails_before_anything_is_written(tmp_path):
    from posttrain.errors import ConfigError

    cfg = compose_config([f"run_dir={tmp_path / 'run'}", *FAST, "algo.loss=dpo_typo"])
    with pytest.raises(
        ConfigError, match="algo.loss='dpo_typo': unknown preference-pair loss .*known names: .*dpo_norm"
    ):
        run_algorithm(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize(
    "name, lr, stage, offload", [("tulu3_8b_dpo", 5e-7, 3, False), ("tulu3_70b_dpo", 2e-7, 3, True)]
)
def test_tulu3_dpo_recipes_hold_the_published_numbers(tmp_path, name, lr, stage, offload):
    cfg = compose_config([f"recipe={name}", f"run_dir={tmp_path}"])
    assert (cfg.algo.name, cfg.algo.loss, cfg.algo.beta) == ("dpo", "dpo_norm", 5.0)
    assert (cfg.optim.lr, cfg.optim.scheduler, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        lr,
        "linear",
        0.1,
        0.0,
    )
    assert (cfg.train.epochs, cfg.data.max_length) == (1, 2048)
    assert cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * 8 == 128  # on 8 GPUs
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params) == (
        stage,
        offload,
        offload,
    )
    assert cfg.model.path


@pytest.mark.integration
def test_sft_then_dpo_raises_held_out_preference_accuracy(tmp_path):
    """The tiny end-to-end pipeline: SFT on column-addition arithmetic, then DPO on correct vs mistaken answers."""
    task = ["data.generator_kwargs.operations=+", "data.generator_kwargs.steps=true", "logger.progress_bar=false"]
    sft_cfg = compose_config(
        [
            f"run_dir={tmp_path / 'sft'}",
            *task,
            "data.num_train=960",
            "data.num_eval=16",
            "train.micro_batch_size=16",
            "train.max_steps=60",
            "optim.lr=3e-3",
        ]
    )
    sft_dir = run_algorithm(sft_cfg)
    dpo_cfg = compose_config(
        [
            f"run_dir={tmp_path / 'dpo'}",
            "recipe=tiny_dpo",
            f"model.path={sft_dir / 'final'}",
            f"algo.reference.cache_dir={tmp_path / 'cache'}",
            "logger.progress_bar=false",
        ]
    )
    run_dir = run_algorithm(dpo_cfg)
    metrics = read_metrics(run_dir)
    before, after = metrics[0], metrics[-1]
    print(
        f"held-out preference accuracy: {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f} "
        f"(policy likelihood preference {before['eval_logp_accuracy']:.3f} -> {after['eval_logp_accuracy']:.3f})"
    )
    assert before["step"] == 0 and before["eval_accuracy"] == 0.5
    assert after["eval_accuracy"] >= 0.9
