"""Online iterative DPO / Direct Nash Optimization (algo=online_dpo; Rosset et al. 2024, practical DNO).

One update = one iteration t, from the policy pi_t: (1) sample K = algo.sampling.n responses for each of
`prompts_per_iteration` prompts (RolloutService); (2) score them with the oracle `algo.oracle` (verifier,
reward_model, gpm: posttrain.rollout.oracles); (3) keep each prompt's (best, worst) pair when the oracle's gap
exceeds `algo.min_margin`; (4) log pi_t of the kept pairs before any update: the previous iterate is the
reference; (5) `epochs_per_iteration` x `steps_per_epoch` optimizer steps of `algo.loss` (any PAIR_LOSSES
member, + `algo.nll_alpha` x the chosen NLL: RPO), each over an even share of the kept pairs in
train.gradient_accumulation_steps micro-batches (the kept count varies); then the engine gets the weights.
Held out: greedy verified accuracy (eval prompts with verifiers); with a reward-model oracle also the score
and win rate of fresh samples against the initial policy's (`posttrain.rollout.oracles.VersusInitial`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config import greedy_eval_request
from posttrain.data.batching import StepPlan, split_evenly
from posttrain.data.loading import load_rows
from posttrain.data.preference import collate_pairs
from posttrain.data.prompts import build_prompt_rows, unique_prompt_rows
from posttrain.engine import backend
from posttrain.engine.distributed import WeightedMeans, all_reduce_sum, rank, world_size
from posttrain.engine.export import export_hf
from posttrain.errors import ConfigError
from posttrain.losses import PAIR_LOSSES
from posttrain.losses.dpo import chosen_nll
from posttrain.models.logprobs import pair_logprob_rows, pair_logprob_sums
from posttrain.models.reward import reward_model_dir_problem
from posttrain.rollout.config import SamplingConfig, sampling_for_step
from posttrain.rollout.oracles import ORACLES, VerifierOracle, VersusInitial
from posttrain.rollout.pairs import SampledPairs, group_statistics, margin_pairs, stand_in_pairs
from posttrain.rollout.samples import grouped_completions, lora_rank, rollout_model_dir
from posttrain.rollout.service import build_rollout_service
from posttrain.trainers import register_algo
from posttrain.training import Run, build_engine, idle_micro_step, micro_steps, pair_micro_batches, policy_module


@dataclass
class OnlineDPOAlgoConfig:
    name: str = "online_dpo"
    oracle: str = "verifier"  # verifier | reward_model (BT) | gpm (general preference)
    reward_model: str | None = None  # reward_model / gpm: a posttrain reward-model dir (final/ of an algo=rm run)
    tau: float | None = None  # null: the reward model's own
    min_margin: float = 0.0  # keep a prompt's (best, worst) pair only when target_best - target_worst > min_margin
    loss: str = "dpo"  # any preference-pair loss: dpo | dpo_norm | simpo | ipo | hinge | wpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    nll_alpha: float = 0.0  # RPO: + nll_alpha x the chosen responses' per-token NLL (0: the plain loss)
    iterations: int = 3
    prompts_per_iteration: int = 64  # over all ranks
    epochs_per_iteration: int = 1  # passes over the iteration's kept pairs
    steps_per_epoch: int = 1  # optimizer steps per pass (each takes an even share of the pairs)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=8, temperature=0.7, max_tokens=64))
    verifier_timeout_s: float = 3.0
    scoring_batch_size: int = 64  # sequences per reward-model forward
    eval_prompts: int = 64  # reward-model oracles: held-out prompts scored against the initial policy's samples


def check_config(cfg) -> None:
    algo = cfg.algo
    PAIR_LOSSES.get(algo.loss, "algo.loss")
    ORACLES.get(algo.oracle, "algo.oracle")
    no_reward_model = algo.oracle != "verifier" and reward_model_dir_problem(algo.reward_model, "algo.reward_model")
    checks = {
        f"algo.oracle={algo.oracle} needs a reward model: {no_reward_model}": bool(no_reward_model),
        f"algo.sampling.n={algo.sampling.n} must be >= 2 (the K responses that make a pair)": algo.sampling.n < 2,
        f"algo.sampling.temperature={algo.sampling.temperature} must be > 0": algo.sampling.temperature <= 0,
        f"algo.prompts_per_iteration={algo.prompts_per_iteration} must be a positive multiple of the world size "
        f"{world_size()}": algo.prompts_per_iteration < 1 or algo.prompts_per_iteration % world_size() != 0,
        "algo.iterations, algo.epochs_per_iteration and algo.steps_per_epoch must be >= 1": (
            min(algo.iterations, algo.epochs_per_iteration, algo.steps_per_epoch) < 1),
        f"algo.nll_alpha={algo.nll_alpha} must be >= 0": algo.nll_alpha < 0,
    }  # fmt: skip
    if problems := [problem for problem, failed in checks.items() if failed]:
        raise ConfigError("; ".join(problems))


@register_algo("online_dpo", schema=OnlineDPOAlgoConfig, curve=("eval_greedy_accuracy", "loss"), check=check_config)
class OnlineDPO:
    def __init__(self, run: Run):
        cfg, algo = run.cfg, run.cfg.algo
        self.cfg = cfg
        self.oracle = ORACLES.get(algo.oracle)(reward_model=algo.reward_model, dtype=cfg.model.dtype, tau=algo.tau,
            sequences_per_forward=algo.scoring_batch_size, verifier_timeout_s=algo.verifier_timeout_s)  # fmt: skip
        train_rows, eval_rows = load_rows(cfg.data, "train"), load_rows(cfg.data, "eval")
        verified = self.oracle.needs_verifier  # else preference data will do: its prompts, once each
        self.train_prompts = build_prompt_rows(train_rows, True) if verified else unique_prompt_rows(train_rows)
        eval_prompts = build_prompt_rows(eval_rows, need_verifier=False) if eval_rows else []
        self.eval_prompts = [p for p in eval_prompts if p.verifier is not None][rank() :: world_size()]
        self.tokenizer = run.load_tokenizer([m["content"] for p in self.train_prompts for m in p.prompt])
        run.commit()
        local = algo.prompts_per_iteration // world_size()  # prompts per rank and iteration
        self.prompt_plan = StepPlan(local, 1, world_size(), len(self.train_prompts), cfg.seed)
        self.steps_per_update = algo.epochs_per_iteration * algo.steps_per_epoch
        self.total_steps = algo.iterations * self.steps_per_update
        if cfg.train.max_steps > 0:  # train.max_steps counts optimizer steps: whole iterations, at least one
            iterations = max(cfg.train.max_steps // self.steps_per_update, 1)
            self.total_steps = min(self.total_steps, iterations * self.steps_per_update)
        self.engine = build_engine(run, policy_module(run), self.total_steps)
        self.oracle.to(self.engine.device)
        model_dir = rollout_model_dir(cfg, run.run_dir, self.engine.module.policy, self.tokenizer)
        self.rollout = build_rollout_service(cfg.rollout, model_dir, self.tokenizer, lora_rank(cfg))
        self.rollout.sync_weights(self.engine)  # a resumed trainer holds newer weights than model_dir
        held_out = [p.prompt for p in unique_prompt_rows(eval_rows)[: algo.eval_prompts]] if eval_rows else []
        self.versus = None if verified else VersusInitial(  # the reward-model oracles' held-out metric
            self.oracle.scorer, self.rollout, held_out, cfg.eval, run.run_dir, run.start_step > 0)  # fmt: skip

    def train_step(self, step: int) -> dict[str, float]:
        """One iteration (module docstring, steps 1-5) and the weight sync."""
        algo, iteration = self.cfg.algo, step // self.steps_per_update
        prompts = [self.train_prompts[i] for i in self.prompt_plan.micro_batches(iteration, rank())[0]]
        started = time.perf_counter()
        sampling = sampling_for_step(algo.sampling, self.cfg.rollout.seed, iteration, rank())
        groups = grouped_completions(self.rollout, [p.prompt for p in prompts], sampling)
        rollout_seconds, started = time.perf_counter() - started, time.perf_counter()
        targets = self.oracle.targets(prompts, groups)
        pairs = margin_pairs(groups, targets, algo.min_margin)
        scoring_seconds, started = time.perf_counter() - started, time.perf_counter()
        # The previous iterate pi_t as the reference: the pairs' log-probs before the update (every rank runs as
        # many forwards, idle ones where it has fewer pairs: ZeRO-3 gathers parameters in each).
        size, packing, pad = self.cfg.train.micro_batch_size, self.cfg.data.packing, self.tokenizer.pad_token_id
        kept = all_reduce_sum([float(len(pairs.examples))])[0]
        budget = self.cfg.train.max_tokens_per_micro_batch
        reference = pair_logprob_rows(self.engine, pairs.examples, size, packing, pad, max_tokens=budget)
        pairs.reference_w, pairs.reference_l = (sums.float() for sums in reference)
        metrics = {}
        if kept:  # no pairs anywhere (every group tied): no update, nothing to sync
            with self.rollout.released(sync_from=self.engine):  # engine asleep for the update, then synced
                metrics = self.update(pairs)
        stats = {**group_statistics(groups, pairs), "target_sum": float(targets.sum()), "prompts": float(len(groups))}
        totals = dict(zip(stats, all_reduce_sum(list(stats.values()))))
        samples = totals["samples"]
        return {
            **metrics, "target_mean": totals["target_sum"] / samples, "pairs_kept_fraction": kept / totals["prompts"],
            "target_margin": totals["target_margin_sum"] / max(kept, 1.0), "response_length": totals["response_tokens"]
            / samples, "truncated_fraction": totals["truncated"] / samples, "lr": backend.current_lr(self.engine),
            "grad_norm": backend.grad_norm(self.engine) if kept else 0.0, "rollout_seconds": rollout_seconds,
            "scoring_seconds": scoring_seconds, "train_seconds": time.perf_counter() - started,
        }  # fmt: skip

    def update(self, pairs: SampledPairs) -> dict[str, float]:
        """epochs x steps_per_epoch optimizer steps, each the gradient of the mean loss over its pairs (all ranks)."""
        cfg, algo, engine = self.cfg, self.cfg.algo, self.engine
        means = WeightedMeans(("loss", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected", "nll"))
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + engine.global_steps)
        idle = 0.0  # micro-steps this rank ran with no pair of its own
        for _ in range(algo.epochs_per_iteration):
            order = torch.randperm(len(pairs.examples), generator=generator).tolist()
            for step_pairs in split_evenly(order, algo.steps_per_epoch):
                step_total = all_reduce_sum([float(len(step_pairs))])[0]
                fixed = split_evenly(step_pairs, cfg.train.gradient_accumulation_steps)
                micro_batches = pair_micro_batches(fixed, pairs.examples, cfg)
                for chunk, weight in micro_steps(engine, micro_batches):  # weight 0: idle (ZeRO-3: as many passes)
                    if chunk is None:  # no pair on this rank at all
                        idle_micro_step(engine, self.stand_in_loss, cfg.optim.max_grad_norm)
                        idle += 1.0
                        continue
                    loss, metrics = self.micro_batch_loss(pairs, chunk)
                    engine.backward(loss * len(chunk) * world_size() / step_total * weight, scale_wrt_gas=False)
                    backend.step(engine, cfg.optim.max_grad_norm)
                    means.add(metrics, len(chunk) * weight)
        return {**means.means(), "idle_micro_steps": all_reduce_sum([idle])[0]}

    def stand_in_loss(self) -> torch.Tensor:
        """The pair loss on `stand_in_pairs`, for `idle_micro_step`: the same forward and outputs as a real
        micro-batch (log-probs only: a backward through the entropy too made ZeRO-3's trace differ and hang)."""
        return self.micro_batch_loss(stand_in_pairs(self.tokenizer.eos_token_id), [0])[0]

    def micro_batch_loss(self, pairs: SampledPairs, chunk: list[int]):
        """(mean loss over the pairs `chunk`, metrics): `algo.loss` + nll_alpha x chosen NLL against the reference
        log-probs (one forward over chosen and rejected)."""
        algo, device, examples = self.cfg.algo, self.engine.device, [pairs.examples[i] for i in chunk]
        batch = collate_pairs(examples, self.cfg.data.packing, self.tokenizer.pad_token_id).to(device)
        policy_w, policy_l = pair_logprob_sums(self.engine, batch)
        index, lengths = torch.tensor(chunk), batch.response_lengths
        reference = (pairs.reference_w[index].to(device), pairs.reference_l[index].to(device))
        chosen_lengths, rejected_lengths = lengths[: len(chunk)], lengths[len(chunk) :]
        loss, metrics = PAIR_LOSSES.get(algo.loss)(
            policy_w, policy_l, *reference, chosen_lengths, rejected_lengths,
            beta=algo.beta, label_smoothing=algo.label_smoothing, **dict(algo.loss_kwargs),
        )  # fmt: skip
        nll = chosen_nll(policy_w, chosen_lengths)
        loss = loss + algo.nll_alpha * nll if algo.nll_alpha else loss
        metrics.update({"loss": loss.detach(), "nll": nll.detach(), "logps/chosen": (policy_w / chosen_lengths).detach()
                        .mean(), "logps/rejected": (policy_l / rejected_lengths).detach().mean()})  # fmt: skip
        return loss, metrics

    def evaluate(self) -> dict[str, float]:
        """`eval_greedy_accuracy`: verified share of greedy answers to the held-out prompts (all ranks); with a
        reward-model oracle, `score_vs_initial` and `win_rate_vs_initial`."""
        correct, prompts = 0.0, self.eval_prompts
        groups = grouped_completions(self.rollout, [p.prompt for p in prompts], greedy_eval_request(self.cfg.eval))
        if prompts:  # every rank generated above, also with no prompts (its rollout group needs it)
            correct = float((VerifierOracle(self.cfg.algo.verifier_timeout_s).targets(prompts, groups) >= 1.0).sum())
        correct, count = all_reduce_sum([correct, float(len(self.eval_prompts))])
        result = {"eval_greedy_accuracy": correct / count} if count else {}
        return result | (self.versus.evaluate(self.rollout, self.engine.global_steps) if self.versus else {})

    def export(self, out_dir: Path) -> None:
        export_hf(self.engine.module.policy, self.tokenizer, out_dir, self.cfg.deepspeed.zero_stage)
