"""General Preference Optimization (algo=gpo) and SPPO (algo.loss=sppo): iterative self-play against a
trained preference model (REFERENCE.md section 3; Zhang et al. 2024, Wu et al. 2024).

One update (an iteration t, from the policy pi_t):
  1. sample K = algo.sampling.n responses for each of `prompts_per_iteration` prompts (RolloutService);
  2. score all K x K pairs with the frozen preference model (each response embedded once);
  3. per-response targets from the score matrix (SELF_PLAY_TARGETS[algo.loss]: s_hat = mean score / tau for
     gpo, the mean win probability for sppo); the best and the worst response of a prompt form its pair;
  4. log pi_t of those pairs, before any update of the iteration (the reference is the previous iterate);
  5. `epochs_per_iteration` passes of the loss over the pairs, then the new weights go into the engine.
The eval metric, `score_vs_initial`, is the mean preference score s(y > y0) of the current policy's samples y
against samples y0 of the initial policy on held-out prompts (drawn once before any update, with `eval.*`, and
kept in run_dir/initial_samples*.jsonl so a resumed run compares against the same ones).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.config import greedy_eval_request, sampled_eval_request
from posttrain.data.batching import StepPlan
from posttrain.data.loading import load_rows
from posttrain.data.preference import collate_pairs
from posttrain.data.prompts import unique_prompt_rows
from posttrain.engine import backend
from posttrain.engine.distributed import WeightedMeans, all_reduce_max, all_reduce_sum, rank, world_size
from posttrain.engine.export import export_hf
from posttrain.errors import ConfigError
from posttrain.losses import SELF_PLAY_LOSSES
from posttrain.losses.preference import mean_preference_scores, self_play_targets
from posttrain.models.logprobs import pair_logprob_rows, pair_logprob_sums
from posttrain.models.reward import load_preference_scorer, reward_model_dir_problem
from posttrain.rollout.config import SamplingConfig, sampling_for_step
from posttrain.rollout.pairs import SampledPairs, best_worst_pairs, group_metrics, group_statistics
from posttrain.rollout.samples import (
    grouped_completions,
    load_or_draw_samples,
    lora_rank,
    rollout_model_dir,
)
from posttrain.rollout.service import build_rollout_service
from posttrain.trainers import register_algo
from posttrain.training import Run, build_engine, micro_steps, pair_loss_scale, pair_micro_batches, policy_module

log = logging.getLogger("posttrain")

LOSS_METRICS = ("loss", "logratio/winner", "logratio/loser", "target/winner", "target/loser")


@dataclass
class GPOAlgoConfig:
    """GPO / SPPO: iterative self-play against a trained preference model (REFERENCE.md section 3). One update
    = one iteration, which gives epochs_per_iteration x (prompts per rank / pairs per step) optimizer steps."""

    name: str = "gpo"
    loss: str = "gpo"  # gpo: targets s_hat = mean GPM score / tau | sppo: mean win probability sigma(s / tau)
    reward_model: str | None = None  # required: a reward-model dir (final/ of an algo=rm run; gpm or bt head)
    beta: float = 0.001  # log-ratio target = s_hat / beta (gpo) or (P_hat - 1/2) / beta (sppo)
    tau: float | None = None  # null: the reward model's own tau (reward_head.json)
    iterations: int = 3  # updates (train.max_steps, in optimizer steps, caps them)
    prompts_per_iteration: int = 64  # over all ranks; one (best, worst) pair each
    epochs_per_iteration: int = 1  # passes over the iteration's pairs (train.micro_batch_size pairs per micro-batch)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=5, temperature=0.7, top_p=0.9))
    eval_prompts: int = 64  # held-out prompts (data eval split) for the score against the initial policy's samples
    check_sync: bool = True  # log the engine-vs-trainer log-prob gap of the samples (top_p=1, top_k=0 only)
    scoring_batch_size: int = 64  # sequences per reward-model forward


def check_config(cfg) -> None:
    """Every GPO setting that can be wrong, checked before anything is read or written; one error lists all."""
    algo = cfg.algo
    self_play_targets(algo.loss)
    problems = [problem for problem in [reward_model_dir_problem(algo.reward_model, "algo.reward_model")] if problem]
    checks = {
        f"algo.sampling.n={algo.sampling.n} must be >= 2 (the K responses per prompt that make the pairs)": (
            algo.sampling.n < 2
        ),
        f"algo.beta={algo.beta} must be > 0": algo.beta <= 0,
        f"algo.tau={algo.tau} must be > 0 (or null: the reward model's own)": algo.tau is not None and algo.tau <= 0,
        f"algo.iterations={algo.iterations} must be >= 1": algo.iterations < 1,
        f"algo.epochs_per_iteration={algo.epochs_per_iteration} must be >= 1": algo.epochs_per_iteration < 1,
    }
    problems += [problem for problem, failed in checks.items() if failed]
    local_prompts, remainder = divmod(algo.prompts_per_iteration, world_size())
    pairs_per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
    if remainder or local_prompts < pairs_per_step:
        problems.append(
            f"algo.prompts_per_iteration={algo.prompts_per_iteration} must be a multiple of the world size "
            f"{world_size()} giving each rank at least train.micro_batch_size x gradient_accumulation_steps = "
            f"{pairs_per_step} pairs"
        )
    if problems:
        raise ConfigError("; ".join(problems))


@register_algo("gpo", schema=GPOAlgoConfig, curve=("score_vs_initial", "loss"), check=check_config)
class GPO:
    def __init__(self, run: Run):
        cfg, algo = run.cfg, run.cfg.algo
        self.cfg, self.run_dir = cfg, run.run_dir
        self.train_prompts = unique_prompt_rows(load_rows(cfg.data, "train"))
        eval_rows = load_rows(cfg.data, "eval")
        eval_prompts = (unique_prompt_rows(eval_rows) if eval_rows else self.train_prompts)[: algo.eval_prompts]
        self.eval_prompts = eval_prompts[rank() :: world_size()]
        self.tokenizer = run.load_tokenizer([m["content"] for p in self.train_prompts for m in p.prompt])
        self.scorer = load_preference_scorer(algo.reward_model, cfg.model.dtype, algo.tau, algo.scoring_batch_size)
        run.commit()
        local_prompts = algo.prompts_per_iteration // world_size()
        self.prompt_plan = StepPlan(local_prompts, 1, world_size(), len(self.train_prompts), cfg.seed)
        self.prompt_plan.step_indices(0)  # fewer train prompts than one iteration fails now, with the numbers
        self.steps_per_epoch = local_prompts // (cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps)
        self.steps_per_update = algo.epochs_per_iteration * self.steps_per_epoch
        self.total_steps = algo.iterations * self.steps_per_update
        if cfg.train.max_steps > 0:
            self.total_steps = min(
                self.total_steps, max(cfg.train.max_steps // self.steps_per_update, 1) * self.steps_per_update
            )
        self.engine = build_engine(run, policy_module(run), self.total_steps)
        self.scorer.model.to(self.engine.device)
        model_dir = rollout_model_dir(cfg, run.run_dir, self.engine.module.policy, self.tokenizer)
        self.rollout = build_rollout_service(cfg.rollout, model_dir, self.tokenizer, lora_rank(cfg))
        self.rollout.sync_weights(self.engine)  # a resumed trainer holds newer weights than model_dir
        self.initial_samples = self.load_or_draw_initial_samples(run.start_step > 0)
        log.info(
            "GPO (%s, beta %g, tau %g): %d train / %d eval prompts, %d iterations of %d prompts x K=%d samples, "
            "%d optimizer steps each", algo.loss, algo.beta, self.scorer.tau, len(self.train_prompts),
            len(eval_prompts), self.total_steps // self.steps_per_update, algo.prompts_per_iteration,
            algo.sampling.n, self.steps_per_update,
        )  # fmt: skip

    def sampling(self, iteration: int) -> SamplingConfig:
        """`algo.sampling` seeded for `iteration` (from its seed or rollout.seed): a resumed run draws the same."""
        return sampling_for_step(self.cfg.algo.sampling, self.cfg.rollout.seed, iteration, rank())

    def train_step(self, step: int) -> dict[str, float]:
        """One self-play iteration (module docstring, steps 1-5) and the weight sync."""
        algo, iteration = self.cfg.algo, step // self.steps_per_update
        prompts = [self.train_prompts[i] for i in self.prompt_plan.micro_batches(iteration, rank())[0]]
        started = time.perf_counter()
        groups = grouped_completions(self.rollout, [p.prompt for p in prompts], self.sampling(iteration))
        rollout_seconds = time.perf_counter() - started
        started = time.perf_counter()
        texts = [[completion.text for completion in group] for group in groups]
        scores = self.scorer.matrices([p.prompt for p in prompts], texts)  # [P, K, K]
        pairs = best_worst_pairs(groups, self_play_targets(algo.loss)(scores, self.scorer.tau))
        s_hat = mean_preference_scores(scores, self.scorer.tau)  # whatever the loss: a comparable spread metric
        stats = {
            **group_statistics(groups, pairs),
            "s_hat_sum": float(s_hat.sum()),
            "s_hat_sq": float((s_hat**2).sum()),
        }
        scoring_seconds = time.perf_counter() - started
        started = time.perf_counter()
        pairs.reference_w, pairs.reference_l = self.pair_logprobs(pairs)
        gap = self.sync_gap(pairs)
        with self.rollout.released(sync_from=self.engine):  # engine asleep for the update, then synced
            metrics = self.update(pairs, iteration)
        totals = dict(zip(stats, all_reduce_sum(list(stats.values()))))
        mean = totals["s_hat_sum"] / totals["samples"]
        metrics.update({
            **group_metrics(totals, algo.sampling.n),
            "s_hat_std": max(totals["s_hat_sq"] / totals["samples"] - mean**2, 0.0) ** 0.5,
            "lr": backend.current_lr(self.engine), "grad_norm": backend.grad_norm(self.engine),
            "rollout_seconds": rollout_seconds, "scoring_seconds": scoring_seconds,
            "train_seconds": time.perf_counter() - started,
        })  # fmt: skip
        if gap is not None:
            metrics["sync/max_logprob_gap"] = max(all_reduce_max([gap])[0], 0.0)
        return metrics

    def pair_logprobs(self, pairs: SampledPairs, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_t of every pair's responses ([N] winner, [N] loser) under the current weights."""
        size, packing, pad = self.cfg.train.micro_batch_size, self.cfg.data.packing, self.tokenizer.pad_token_id
        budget = self.cfg.train.max_tokens_per_micro_batch
        return pair_logprob_rows(self.engine, pairs.examples, size, packing, pad, temperature, max_tokens=budget)

    def sync_gap(self, pairs: SampledPairs) -> float | None:
        """Largest |engine - trainer| summed log-prob over the pairs' responses (sampled by pi_t, scored as pi_t
        by the trainer): ~0 when the engine holds the trainer's weights. None where the engine's log-probs are not
        the plain tempered distribution (top_p < 1, top_k > 0) or algo.check_sync is off."""
        sampling = self.cfg.algo.sampling
        if not self.cfg.algo.check_sync or sampling.top_p < 1.0 or sampling.top_k > 0:
            return None
        if sampling.temperature == 1.0:
            trainer_w, trainer_l = pairs.reference_w, pairs.reference_l
        else:
            trainer_w, trainer_l = self.pair_logprobs(pairs, sampling.temperature)
        return float(torch.cat([(pairs.engine_w - trainer_w).abs(), (pairs.engine_l - trainer_l).abs()]).max())

    def update(self, pairs: SampledPairs, iteration: int) -> dict[str, float]:
        """`epochs_per_iteration` passes over the pairs; metrics are pair-weighted means over all micro-batches."""
        cfg, engine, train = self.cfg, self.engine, self.cfg.train
        # Local pairs: DeepSpeed's mean over ranks makes the global mean.
        seed = cfg.seed * 7919 + iteration
        plan = StepPlan(train.micro_batch_size, train.gradient_accumulation_steps, 1, len(pairs.examples), seed)
        loss_fn = SELF_PLAY_LOSSES.get(cfg.algo.loss)
        means = WeightedMeans(LOSS_METRICS)
        for step in range(self.steps_per_update):
            micro_batches = pair_micro_batches(plan.micro_batches(step, 0), pairs.examples, cfg)
            for indices, weight in micro_steps(engine, micro_batches):  # weight 0: an idle micro-step (ZeRO-3)
                batch = collate_pairs(
                    [pairs.examples[i] for i in indices], cfg.data.packing, self.tokenizer.pad_token_id
                )
                policy_w, policy_l = pair_logprob_sums(engine, batch.to(engine.device))
                picked = torch.tensor(indices)
                given = (pairs.reference_w, pairs.reference_l, pairs.target_w, pairs.target_l)
                loss, metrics = loss_fn(
                    policy_w, policy_l, *(t[picked].to(policy_w.device) for t in given), beta=cfg.algo.beta
                )
                engine.backward(loss * pair_loss_scale(len(indices), plan) * weight, scale_wrt_gas=False)
                backend.step(engine, cfg.optim.max_grad_norm)
                means.add(metrics, len(indices) * weight)
        return means.means()

    def eval_request(self, seed: int) -> SamplingConfig:
        eval_cfg = self.cfg.eval
        return sampled_eval_request(eval_cfg, seed=seed) if eval_cfg.samples > 0 else greedy_eval_request(eval_cfg)

    def load_or_draw_initial_samples(self, resumed: bool) -> list[list[str]]:
        """The initial policy's samples on this rank's eval prompts: from the run dir, or drawn now."""
        name = "initial_samples.jsonl" if world_size() == 1 else f"initial_samples.rank{rank()}.jsonl"
        prompts = [p.prompt for p in self.eval_prompts]
        return load_or_draw_samples(self.run_dir / name, self.rollout, prompts, self.eval_request(-1), resumed)

    def evaluate(self) -> dict[str, float]:
        """Mean s(y > y0) and win rate sigma(s / tau) of fresh samples y of the current policy against the
        initial y0 (per sample: the mean over the prompt's y0), with the spread and the response length."""
        totals = [0.0] * 5  # score sum, score^2 sum, win-rate sum, samples, tokens
        prompts = [p.prompt for p in self.eval_prompts]  # every rank generates, also with none (rollout groups)
        groups = grouped_completions(self.rollout, prompts, self.eval_request(10_000 + self.engine.global_steps))
        if prompts:
            texts = [[c.text for c in group] for group in groups]
            per_sample, win_rate = self.scorer.versus(prompts, texts, self.initial_samples)
            totals = [
                float(per_sample.sum()), float((per_sample**2).sum()), float(win_rate.sum()),
                float(per_sample.numel()), float(sum(len(c.token_ids) for group in groups for c in group)),
            ]  # fmt: skip
        score, score_sq, wins, samples, tokens = all_reduce_sum(totals)
        samples = max(samples, 1.0)
        mean = score / samples
        return {
            "score_vs_initial": mean, "score_vs_initial_std": max(score_sq / samples - mean**2, 0.0) ** 0.5,
            "win_rate_vs_initial": wins / samples, "eval_response_length": tokens / samples,
        }  # fmt: skip

    def export(self, out_dir: Path) -> None:
        export_hf(self.engine.module.policy, self.tokenizer, out_dir, self.cfg.deepspeed.zero_stage)
