"""GPO / SPPO self-play (algo=gpo): config errors, the task data, the tiny end-to-end run with weight sync
verified, and resume at an iteration boundary.

The tiny task: a policy SFT'd to play a random legal move of a named game (data=game_moves), a GPM trained
on the transitive variant of the same games (recipe=tiny_gpm_cyclic), self-play with conf/recipe/tiny_gpo.yaml.
"""

import json

import pytest
import torch
from helpers import compose_config

from posttrain.errors import ConfigError
from posttrain.logging import read_metrics
from posttrain.trainers import get_algorithm
from posttrain.training import run_algorithm, run_loop, start_run

TIMING = ("rollout_seconds", "scoring_seconds", "train_seconds", "grad_norm")


def gpo_config(run_dir, *overrides):
    return compose_config([f"run_dir={run_dir}", "recipe=tiny_gpo", "logger.progress_bar=false", *overrides])


@pytest.fixture()
def fake_reward_model(tmp_path):
    """A directory that passes the config check (the error tests stop before anything loads it)."""
    path = tmp_path / "rm"
    path.mkdir()
    (path / "reward_head.json").write_text("{}")
    return path


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo.sampling.n=1"], r"algo.sampling.n=1 must be >= 2"),
        (["algo.beta=0"], r"algo.beta=0.0 must be > 0"),
        (["algo.prompts_per_iteration=4"], r"algo.prompts_per_iteration=4 must be .* at least .* = 8 pairs"),
        (["algo.loss=dpo"], r"algo.loss='dpo': 'dpo' is a preference-pair loss, not a self-play loss; .*gpo, sppo"),
    ],
)
def test_bad_gpo_settings_fail_naming_the_key_before_writing_anything(tmp_path, fake_reward_model, overrides, message):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        run_algorithm(gpo_config(run_dir, f"algo.reward_model={fake_reward_model}", *overrides))
    assert not run_dir.exists()


def test_missing_or_wrong_reward_model_fails_naming_the_key(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"algo.reward_model=None is not a posttrain reward-model directory"):
        run_algorithm(gpo_config(run_dir))
    with pytest.raises(ConfigError, match=r"algo.reward_model=.* is not a posttrain reward-model directory"):
        run_algorithm(gpo_config(run_dir, f"algo.reward_model={tmp_path}"))
    assert not run_dir.exists()


def test_game_moves_play_legal_moves_on_the_cyclic_preference_prompts():
    from data_recipes import generate_task
    from data_recipes.preference import CYCLIC_GAMES, PLAYERS, PROMPT_TEMPLATES

    train, held_out = generate_task("game_moves", "train", 200, seed=0), generate_task("game_moves", "eval", 40, seed=0)
    prompts = {
        split: {r["prompt"][0]["content"] for r in rows} for split, rows in (("train", train), ("eval", held_out))
    }
    assert len(prompts["train"]) == 200 and len(prompts["eval"]) == 40 and not prompts["train"] & prompts["eval"]
    every_prompt = {
        t.format(player=a, opponent=b, game=g)
        for t in PROMPT_TEMPLATES
        for a in PLAYERS
        for b in PLAYERS
        for g in CYCLIC_GAMES
    }
    assert prompts["train"] | prompts["eval"] <= every_prompt  # the prompt space of cyclic_preference
    for row in train + held_out:
        assert row["messages"][0] == row["prompt"][0] and row["messages"][1]["content"] in CYCLIC_GAMES[row["subset"]]
    # The transitive control keeps the responses and reverses only the closing pair.
    cyclic_rows = generate_task("cyclic_preference", "train", 3, seed=0)
    transitive_rows = generate_task("cyclic_preference", "train", 3, seed=0, order="transitive")
    assert cyclic_rows[:2] == transitive_rows[:2]
    assert (cyclic_rows[2]["chosen"], cyclic_rows[2]["rejected"]) == (
        transitive_rows[2]["rejected"],
        transitive_rows[2]["chosen"],
    )


@pytest.fixture(scope="module")
def game_policy(tmp_path_factory):
    """final/ of 100 SFT steps on data=game_moves: the policy plays a (roughly uniform) legal move."""
    from posttrain.training import run_algorithm

    run_dir = tmp_path_factory.mktemp("game_sft")
    cfg = compose_config(
        [
            f"run_dir={run_dir}",
            "data=game_moves",
            "data.num_eval=0",
            "train.max_steps=100",
            "train.epochs=10",
            "train.micro_batch_size=16",
            "optim.lr=3e-3",
            "logger.progress_bar=false",
        ]
    )
    return run_algorithm(cfg) / "final"


@pytest.fixture(scope="module")
def game_gpm(tmp_path_factory):
    """final/ of a GPM on the transitive game preferences (held-out accuracy 1.0 after two epochs)."""
    from posttrain.training import run_algorithm

    run_dir = tmp_path_factory.mktemp("game_gpm")
    cfg = compose_config(
        [
            f"run_dir={run_dir}",
            "recipe=tiny_gpm_cyclic",
            "+data.generator_kwargs.order=transitive",
            "train.epochs=2",
            "logger.progress_bar=false",
        ]
    )
    run_algorithm(cfg)
    assert read_metrics(run_dir)[-1]["eval_accuracy"] >= 0.95
    return run_dir / "final"


def engine_matches_trainer(trainer, prompts) -> tuple[bool, float]:
    """(the engine's greedy completions equal transformers greedy on the trainer's weights, the largest
    |engine - trainer| log-prob of a sampled completion's tokens)."""
    from rollout_helpers import recomputed_logprobs, reference_greedy

    from posttrain.rollout.config import SamplingConfig

    policy = trainer.engine.module.policy
    greedy = trainer.rollout.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=8))
    expected = reference_greedy(policy, [c.prompt_token_ids for c in greedy], 8, trainer.tokenizer.eos_token_id)
    sampled = trainer.rollout.generate(prompts, SamplingConfig(n=1, temperature=1.0, max_tokens=8))
    gap = max(
        float((torch.tensor(c.logprobs) - recomputed_logprobs(policy, c.prompt_token_ids, c.token_ids)).abs().max())
        for c in sampled
    )
    return [c.token_ids for c in greedy] == expected, gap


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.isolated
def test_gpo_raises_the_score_against_the_initial_policy_with_the_engine_in_sync(tmp_path, game_policy, game_gpm):
    cfg = gpo_config(tmp_path / "gpo", f"model.path={game_policy}", f"algo.reward_model={game_gpm}")
    run = start_run(cfg, get_algorithm("gpo"))
    trainer = get_algorithm("gpo").entry(run)
    run_loop(run, trainer)
    metrics = read_metrics(run.run_dir)
    scores = [m["score_vs_initial"] for m in metrics]
    print(
        "GPO per iteration: "
        + "; ".join(
            f"it {m['step']}: score_vs_initial {m['score_vs_initial']:+.3f} win_rate {m['win_rate_vs_initial']:.3f}"
            + (
                f" loss {m['loss']:.3f} s_hat_std {m['s_hat_std']:.2f} len {m['response_length']:.2f} sync_gap "
                f"{m['sync/max_logprob_gap']:.1e}"
                if m["step"]
                else ""
            )
            for m in metrics
        )
    )
    assert [m["step"] for m in metrics] == [0, 8, 16, 24]  # an iteration: 2 epochs x 32 pairs / 8 a step
    assert abs(scores[0]) < 0.2  # the initial policy against its own earlier samples
    assert scores[1] > scores[0] + 0.1 and scores[3] > scores[1]
    for m in metrics[1:]:
        assert m["logratio/winner"] != 0.0  # the policy moved, so a missed sync would show in the next gap
        assert m["sync/max_logprob_gap"] < 1e-3  # each iteration sampled from the weights the trainer held
    # After the last sync the engine decodes exactly like the trainer's model ...
    prompts = [p.prompt for p in trainer.eval_prompts[:8]]
    same_greedy, gap = engine_matches_trainer(trainer, prompts)
    assert same_greedy and gap < 1e-3
    # ... and the comparison would catch a stale engine.
    with torch.no_grad():
        lm_head = trainer.engine.module.policy.lm_head.weight
        lm_head.add_(0.05 * torch.randn_like(lm_head))
    assert engine_matches_trainer(trainer, prompts)[1] > 1e-2
    trainer.rollout.sync_weights(trainer.engine)
    same_greedy, gap = engine_matches_trainer(trainer, prompts)
    assert same_greedy and gap < 1e-3
    run_dir = run.run_dir
    assert (run_dir / "final" / "model.safetensors").exists() and (run_dir / "checkpoints" / "step_24").is_dir()
    assert len((run_dir / "initial_samples.jsonl").read_text().splitlines()) == 32


@pytest.mark.integration
def test_sppo_resumed_at_an_iteration_boundary_continues_like_the_uninterrupted_run(tmp_path, game_policy, game_gpm):
    """hf rollout, no algo.sampling.seed: each iteration's sampling seed derives from rollout.seed, the step and
    the rank (posttrain.rollout.config.sampling_for_step), so the resumed run draws the same samples."""
    common = [
        f"model.path={game_policy}",
        f"algo.reward_model={game_gpm}",
        "algo.loss=sppo",
        "algo.beta=0.2",
        "rollout=hf",
        "rollout.max_model_len=128",
        "checkpoint.every=1",
    ]
    whole = run_algorithm(gpo_config(tmp_path / "whole", *common, "algo.iterations=2"))
    run_algorithm(gpo_config(tmp_path / "parts", *common, "algo.iterations=1"))
    parts = run_algorithm(gpo_config(tmp_path / "parts", *common, "algo.iterations=2"))  # resumes from step_8
    expected, resumed = read_metrics(whole), read_metrics(parts)
    print("SPPO score_vs_initial per iteration: " + ", ".join(f"{m['score_vs_initial']:+.3f}" for m in expected))
    assert [m["step"] for m in resumed] == [0, 8, 16]
    for a, b in zip(expected, resumed):
        assert {k: v for k, v in a.items() if k not in TIMING} == pytest.approx(
            {k: v for k, v in b.items() if k not in TIMING}, rel=1e-5
        )
    assert expected[2]["score_vs_initial"] > expected[0]["score_vs_initial"] + 0.1  # sppo climbs the same way
    assert (parts / "initial_samples.jsonl").read_text() == (whole / "initial_samples.jsonl").read_text()
    assert json.loads((parts / "checkpoints" / "step_16" / "trainer_state.json").read_text())["algo"] == "gpo"
