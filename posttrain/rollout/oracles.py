"""Preference oracles for on-policy pairs: K sampled responses per prompt -> a target per response [P, K].

An oracle ranks a prompt's K responses; the trainer keeps the best and the worst as a pair when their target
gap is large enough (`posttrain.rollout.pairs.margin_pairs`). Registered by name in ORACLES:
- `verifier`: the row's verifier score in [0, 1] (`posttrain.rewards`; errors and timeouts score 0);
- `reward_model`: a Bradley-Terry reward model: s_hat = mean_j (r_i - r_j) / tau, which orders responses as r does;
- `gpm`: a General Preference Model: the mean win probability against the other responses,
  P_hat_i = mean_j sigma(s(y_i > y_j) / tau), the general-preference oracle of DNO (Rosset et al. 2024).
The reward-model oracles load a posttrain reward-model dir (`posttrain.models.reward.load_preference_scorer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.losses.preference import mean_preference_scores, mean_win_probabilities
from posttrain.models.reward import PreferenceScorer, load_preference_scorer
from posttrain.registry import Registry
from posttrain.rewards.reward import DEFAULT_TIMEOUT_S, score_batch
from posttrain.rollout.completion import Completion

ORACLES: Registry = Registry("preference oracle")


@dataclass
class VerifierOracle:
    """Targets = the verifier score of each response against its prompt row's ground truth."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    needs_verifier: bool = True
    counts: dict = field(default_factory=dict)  # ok / error / timeout of the last call

    def targets(self, prompts, groups: list[list[Completion]]) -> torch.Tensor:
        """prompts: rows with `.verifier` and `.ground_truth` (PromptRow); groups: K completions each."""
        rows = [{"verifier": p.verifier, "ground_truth": p.ground_truth} for p, g in zip(prompts, groups) for _ in g]
        texts = [c.text for group in groups for c in group]
        scores, self.counts = score_batch(rows, texts, [True] * len(texts), 1.0, 0.0, self.timeout_s)
        return torch.tensor(scores, dtype=torch.float32).view(len(groups), -1)

    def to(self, device) -> VerifierOracle:
        return self


@dataclass
class ScorerOracle:
    """Targets from a frozen preference model's K x K score matrix per prompt (each response embedded once)."""

    scorer: PreferenceScorer
    target: str  # "mean_score" (s_hat) | "win_probability" (P_hat)
    needs_verifier: bool = False

    def targets(self, prompts, groups: list[list[Completion]]) -> torch.Tensor:
        scores = self.scorer.matrices([p.prompt for p in prompts], [[c.text for c in group] for group in groups])
        reduce = mean_preference_scores if self.target == "mean_score" else mean_win_probabilities
        return reduce(scores, self.scorer.tau).float()

    def to(self, device) -> ScorerOracle:
        self.scorer.model.to(device)
        return self


@ORACLES.register("verifier")
def verifier_oracle(*, verifier_timeout_s: float = DEFAULT_TIMEOUT_S, **_) -> VerifierOracle:
    return VerifierOracle(verifier_timeout_s)


@ORACLES.register("reward_model")
def reward_model_oracle(*, reward_model: str, dtype: str = "float32", tau: float | None = None,
                        sequences_per_forward: int = 64, **_) -> ScorerOracle:  # fmt: skip
    return ScorerOracle(load_preference_scorer(reward_model, dtype, tau, sequences_per_forward), "mean_score")


@ORACLES.register("gpm")
def gpm_oracle(*, reward_model: str, dtype: str = "float32", tau: float | None = None,
               sequences_per_forward: int = 64, **_) -> ScorerOracle:  # fmt: skip
    return ScorerOracle(load_preference_scorer(reward_model, dtype, tau, sequences_per_forward), "win_probability")


class VersusInitial:
    """A held-out metric for the reward-model oracles: fresh samples of the current policy scored against samples
    of the initial policy on the same prompts, as the mean preference score s(y > y0) and the win rate
    sigma(s / tau) (GPO's `score_vs_initial`). The initial samples are drawn once (eval.* sampling: greedy, or
    eval.samples per prompt) and kept in run_dir/initial_samples.rank<r>.jsonl, so a resumed run compares
    against the same ones. `prompts` are all ranks' (chat messages); each rank takes its share."""

    def __init__(self, scorer: PreferenceScorer, rollout, prompts: list, eval_cfg, run_dir, resumed: bool):
        from posttrain.engine.distributed import rank, world_size
        from posttrain.rollout.samples import load_or_draw_samples

        self.scorer, self.eval_cfg, self.prompts = scorer, eval_cfg, list(prompts)[rank() :: world_size()]
        path = Path(run_dir) / f"initial_samples.rank{rank()}.jsonl"
        self.initial = load_or_draw_samples(path, rollout, self.prompts, self.request(-1), resumed)

    def request(self, seed: int):
        from posttrain.config import greedy_eval_request, sampled_eval_request

        cfg = self.eval_cfg
        return sampled_eval_request(cfg, seed=seed) if cfg.samples > 0 else greedy_eval_request(cfg)

    def evaluate(self, rollout, step: int) -> dict[str, float]:
        """Means over all ranks' samples (a collective: every rank calls it); `step` seeds the sampling."""
        from posttrain.engine.distributed import all_reduce_sum
        from posttrain.rollout.samples import grouped_completions

        totals = [0.0, 0.0, 0.0]  # score sum, win-rate sum, samples
        groups = grouped_completions(rollout, self.prompts, self.request(10_000 + step))  # also with no prompts
        if self.prompts:
            score, win_rate = self.scorer.versus(self.prompts, [[c.text for c in g] for g in groups], self.initial)
            totals = [float(score.sum()), float(win_rate.sum()), float(score.numel())]
        score, wins, samples = all_reduce_sum(totals)
        return {"score_vs_initial": score / max(samples, 1.0), "win_rate_vs_initial": wins / max(samples, 1.0)}
