"""Online iterative DPO / DNO (algo=online_dpo): config errors, the oracles and margin pair selection by hand,
and the tiny end-to-end run on the arithmetic task with the verifier as the oracle."""

import pytest
import torch
from helpers import compose_config

from posttrain.data.prompts import PromptRow
from posttrain.errors import ConfigError
from posttrain.rollout.completion import Completion
from posttrain.rollout.oracles import ORACLES, ScorerOracle
from posttrain.rollout.pairs import margin_pairs
from posttrain.training import run_algorithm


def dno_config(run_dir, *overrides):
    return compose_config([f"run_dir={run_dir}", "recipe=tiny_online_dpo", "logger.progress_bar=false", *overrides])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo.loss=gpo"], r"algo.loss='gpo': 'gpo' is a self-play loss, not a preference-pair loss"),
        (["algo.oracle=judge"], r"algo.oracle='judge': unknown preference oracle 'judge'; known names: gpm, "),
        (
            ["algo.oracle=gpm"],
            r"algo.oracle=gpm needs a reward model: algo.reward_model=None is not a posttrain reward",
        ),
        (["algo.sampling.n=1"], r"algo.sampling.n=1 must be >= 2"),
        (["algo.steps_per_epoch=0"], r"algo.steps_per_epoch must be >= 1"),
    ],
)
def test_bad_settings_fail_naming_the_key_before_writing_anything(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_algorithm(dno_config(tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


def completion(prompt_index, sample_index, text):
    tokens = [10 + sample_index, 2]
    return Completion(prompt_index, sample_index, [1, 5], tokens, text, [-0.5, -0.25], "stop")


def test_verifier_oracle_scores_each_sample_against_its_own_row():
    prompts = [PromptRow([{"role": "user", "content": "What is 2 + 2?"}], "gsm8k", "4", "row 1"),
               PromptRow([{"role": "user", "content": "What is 5 + 7?"}], "gsm8k", "12", "row 2")]  # fmt: skip
    groups = [[completion(0, 0, "#### 4"), completion(0, 1, "#### 5"), completion(0, 2, "2 + 2 = 4")],
              [completion(1, 0, "#### 13"), completion(1, 1, "#### 11"), completion(1, 2, "#### 12")]]  # fmt: skip
    targets = ORACLES.get("verifier")().targets(prompts, groups)
    assert targets.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]  # gsm8k: the last number is the answer


def test_reward_model_oracles_reduce_the_score_matrix_by_hand():
    """BT rewards r = (1, 3, 0) give S[i, j] = r_i - r_j; with tau 0.5 the reward_model target is mean_j S / tau
    = ((1 - 4/3), (3 - 4/3), (0 - 4/3)) / 0.5 and the gpm target mean_j sigma(S_ij / tau) (the j = i term 1/2)."""
    r = torch.tensor([1.0, 3.0, 0.0])
    scores = (r[:, None] - r[None, :])[None]

    class Scorer:
        tau = 0.5

        def matrices(self, prompts, responses):
            return scores

    groups = [[completion(0, k, str(k)) for k in range(3)]]
    prompt = [PromptRow([{"role": "user", "content": "x"}], None, None, "row 1")]
    mean_score = ScorerOracle(Scorer(), "mean_score").targets(prompt, groups)
    assert torch.allclose(mean_score, torch.tensor([[-1 / 3, 5 / 3, -4 / 3]]) / 0.5)
    sig = torch.sigmoid
    expected = torch.tensor([[(0.5 + sig(torch.tensor(-4.0)) + sig(torch.tensor(2.0))) / 3,
                              (sig(torch.tensor(4.0)) + 0.5 + sig(torch.tensor(6.0))) / 3,
                              (sig(torch.tensor(-2.0)) + sig(torch.tensor(-6.0)) + 0.5) / 3]])  # fmt: skip
    assert torch.allclose(ScorerOracle(Scorer(), "win_probability").targets(prompt, groups), expected)


def test_margin_pairs_keep_best_and_worst_only_above_the_margin():
    groups = [[completion(p, k, f"{p}{k}") for k in range(3)] for p in range(3)]
    targets = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.5, 0.9]])
    pairs = margin_pairs(groups, targets, min_margin=0.0)
    # Prompt 1 (all equal) gives no pair; prompt 0: best 1 (first max), worst 0 (first min); prompt 2: 2 vs 0.
    assert [(e.chosen.input_ids[-2], e.rejected.input_ids[-2]) for e in pairs.examples] == [(11, 10), (12, 10)]
    assert pairs.target_w.tolist() == [1.0, pytest.approx(0.9)] and pairs.target_l.tolist() == [0.0, pytest.approx(0.2)]
    assert pairs.engine_w.tolist() == [-0.75, -0.75]
    assert len(margin_pairs(groups, targets, min_margin=0.8).examples) == 1  # only prompt 0's gap 1.0 > 0.8


@pytest.mark.integration
@pytest.mark.isolated
def test_dno_with_the_verifier_raises_greedy_held_out_accuracy(noisy_sft_model, tmp_path):
    """DNO from the carry-forgetting SFT model (greedy ~0.57 on the recipe's 100 held-out prompts), the gsm8k
    verifier as the only oracle: 4 iterations of the tiny recipe lift greedy accuracy by >= 8 points (measured
    with vLLM sampling: 0.57 -> 0.77; here transformers generate samples, so this test needs no vLLM engine and
    can share the isolated process with the RLVR test, before it)."""
    from posttrain.logging import read_metrics

    run_dir = run_algorithm(dno_config(tmp_path / "dno", f"model.path={noisy_sft_model}", "rollout=hf"))
    metrics = read_metrics(run_dir)
    evals = [m["eval_greedy_accuracy"] for m in metrics]
    print(f"DNO greedy held-out accuracy per iteration: {evals}")
    assert [m["step"] for m in metrics] == [0, 4, 8, 12, 16]  # 4 iterations of 4 optimizer steps
    assert evals[-1] >= evals[0] + 0.08, evals
    for m in metrics[1:]:
        assert 0.0 < m["pairs_kept_fraction"] <= 1.0 and m["target_margin"] == 1.0  # verifier pairs: right vs wrong
    assert (run_dir / "final" / "model.safetensors").exists()


def test_versus_initial_scores_fresh_samples_against_the_kept_initial_ones(tmp_path):
    """BT rewards r(y) = len(y) give s(y > y0) = len(y) - len(y0); the initial samples are drawn once and kept."""
    from omegaconf import OmegaConf

    from posttrain.models.reward import PreferenceScorer
    from posttrain.rollout.oracles import VersusInitial

    class LengthScorer(PreferenceScorer):
        def matrices(self, prompts, responses):
            r = torch.tensor([[float(len(y)) for y in group] for group in responses])
            return r[:, :, None] - r[:, None, :]

    class Rollout:  # answers "a" * length, the length growing with every call
        length = 1

        def generate(self, prompts, sampling):
            text = "a" * self.length
            self.length += 2
            return [completion(p, k, text) for p in range(len(prompts)) for k in range(sampling.n)]

    prompts = [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]]
    eval_cfg = OmegaConf.create({"samples": 2, "temperature": 1.0, "top_p": 1.0, "max_tokens": 4, "seed": 0})
    rollout, scorer = Rollout(), LengthScorer(None, None, 1.0, 8)
    versus = VersusInitial(scorer, rollout, prompts, eval_cfg, tmp_path, resumed=False)
    assert versus.initial == [["a", "a"], ["a", "a"]]  # drawn now (length 1) and written
    metrics = versus.evaluate(rollout, step=5)  # fresh samples have length 3: s = 3 - 1 = 2 against each y0
    assert metrics["score_vs_initial"] == pytest.approx(2.0)
    assert metrics["win_rate_vs_initial"] == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))))
    resumed = VersusInitial(scorer, rollout, prompts, eval_cfg, tmp_path, resumed=True)
    assert resumed.initial == versus.initial  # read back, not drawn again
