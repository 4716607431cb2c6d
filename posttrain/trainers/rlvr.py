"""RL with verifiable rewards: GRPO-family policy optimisation on the shared rollout service.

One update = one rollout batch: sample G completions for each prompt (RolloutService), score them with the
row's verifier, turn rewards into group advantages (dropping zero-variance groups), recompute the old log-probs
with the trainer (skipped when the update is one optimizer step: they are then the step's own, detached), take
`epochs_per_batch x minibatches_per_epoch` clipped policy-gradient optimizer steps, sync the engine's weights.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.config import greedy_eval_request, sampled_eval_request
from posttrain.data.batching import StepPlan, split_evenly
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.data.loading import load_rows
from posttrain.data.prompts import build_prompt_rows, drop_long_prompts
from posttrain.engine import backend
from posttrain.engine.distributed import all_reduce_sum, rank, world_size
from posttrain.engine.export import export_hf, gathered_parameters, hf_state_dict
from posttrain.engine.reference import frozen_model
from posttrain.errors import ConfigError
from posttrain.losses import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.losses.policy import AGGREGATIONS, chunk_loss_weight, group_advantages
from posttrain.models.logprobs import completion_logprob_rows, completion_logprobs, padded_rows
from posttrain.rewards import VERIFIERS
from posttrain.rewards.reward import score_batch
from posttrain.rollout.config import SamplingConfig
from posttrain.rollout.samples import PolicySample, policy_samples, rollout_model_dir
from posttrain.rollout.service import build_rollout_service
from posttrain.trainers import register_algo
from posttrain.training import Run, build_engine, policy_module, total_optimizer_steps

log = logging.getLogger("posttrain")


@dataclass
class RLVRAlgoConfig:
    """GRPO-family RL with verifiable rewards (REFERENCE.md section 4). One update = one rollout batch, which
    gives epochs_per_batch x minibatches_per_epoch optimizer steps (train.max_steps counts optimizer steps)."""

    name: str = "rlvr"
    prompts_per_step: int = 16  # prompts per rollout batch, over all ranks
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=8, temperature=1.0, max_tokens=64))
    advantage: str = "standard"  # standard: (r - mean) / (std + eps) | centered: r - mean
    drop_zero_variance_groups: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher
    kl_beta: float = 0.0  # > 0 keeps a frozen reference policy
    kl_estimator: str = "k3"  # k1 | k2 | k3
    entropy_coef: float = 0.0
    aggregation: str = "token_mean"  # token_mean | sequence_mean | sum_constant (Dr. GRPO)
    epochs_per_batch: int = 1  # passes over each rollout batch (PPO epochs)
    minibatches_per_epoch: int = 1  # optimizer steps per pass
    verification_reward: float = 10.0  # Tülu 3: 10 for a verified answer
    nonstop_penalty: float = 0.0  # added when a completion hits max_tokens without stopping (Tülu 3: -10)
    verifier_timeout_s: float = 3.0
    reference_refresh_every: int = 0  # optimizer steps between copies of the policy into the reference (0: never)


def check_config(cfg) -> None:
    algo, problems = cfg.algo, []
    ADVANTAGE_ESTIMATORS.get(algo.advantage, "algo.advantage")
    KL_ESTIMATORS.get(algo.kl_estimator, "algo.kl_estimator")
    checks = {
        f"algo.prompts_per_step={algo.prompts_per_step} must be a positive multiple of the world size {world_size()}": (
            algo.prompts_per_step < 1 or algo.prompts_per_step % world_size() != 0
        ),
        "algo.sampling.n must be >= 2 for group advantages (a group of one has no variance)": algo.sampling.n < 2,
        f"algo.sampling.temperature={algo.sampling.temperature} must be > 0: RL learns from sampled completions": (
            algo.sampling.temperature <= 0
        ),
        f"algo.aggregation={algo.aggregation!r} must be one of {', '.join(AGGREGATIONS)}": (
            algo.aggregation not in AGGREGATIONS
        ),
        "algo.epochs_per_batch and algo.minibatches_per_epoch must be >= 1": (
            algo.epochs_per_batch < 1 or algo.minibatches_per_epoch < 1
        ),
        "algo.reference_refresh_every needs full fine-tuning: with peft=lora the reference is the base model": (
            algo.reference_refresh_every > 0 and cfg.peft.enabled
        ),
    }
    problems += [problem for problem, failed in checks.items() if failed]
    if problems:
        raise ConfigError("; ".join(problems))


@register_algo("rlvr", schema=RLVRAlgoConfig, curve=("reward_mean",), check=check_config)
class RLVR:
    def __init__(self, run: Run):
        cfg = self.cfg = run.cfg
        train_rows, eval_rows = load_rows(cfg.data, "train"), load_rows(cfg.data, "eval")
        known, verifier_map, budget = VERIFIERS.names(), dict(cfg.data.verifier_map), cfg.data.max_length
        self.train_prompts = build_prompt_rows(train_rows, True, known, verifier_map)
        self.eval_prompts = build_prompt_rows(eval_rows, True, known, verifier_map) if eval_rows else []
        self.tokenizer = run.load_tokenizer([m["content"] for p in self.train_prompts for m in p.prompt])
        self.train_prompts = drop_long_prompts(self.train_prompts, self.tokenizer, budget, "train")
        self.eval_prompts = drop_long_prompts(self.eval_prompts, self.tokenizer, budget, "eval") if eval_rows else []
        run.commit()
        module = policy_module(run)
        self.reference = None
        if cfg.algo.kl_beta != 0.0 and not cfg.peft.enabled:  # with LoRA the base model (adapters off) is it
            self.reference = frozen_model(policy_module(run), cfg.deepspeed.zero_stage, cfg.model.dtype)
        self.plan = StepPlan(
            cfg.algo.prompts_per_step // world_size(), 1, world_size(), len(self.train_prompts), cfg.seed
        )
        self.steps_per_update = cfg.algo.epochs_per_batch * cfg.algo.minibatches_per_epoch
        self.total_steps = total_optimizer_steps(self.plan, cfg.train, self.steps_per_update)
        self.engine = build_engine(run, module, self.total_steps)
        model_dir = rollout_model_dir(cfg, run.run_dir, self.engine.module.policy, self.tokenizer)
        self.rollout = build_rollout_service(cfg.rollout, model_dir, self.tokenizer)
        self.rollout.sync_weights(self.engine)  # the engine may hold older weights than the trainer (resume)
        log.info(
            "RLVR: %d train / %d eval prompts, %d rollout batches of %d prompts x %d samples, %d optimizer steps each",
            len(self.train_prompts), len(self.eval_prompts), self.total_steps // self.steps_per_update,
            cfg.algo.prompts_per_step, cfg.algo.sampling.n, self.steps_per_update,
        )  # fmt: skip

    def train_step(self, step: int) -> dict[str, float]:
        """One rollout batch and the optimizer steps `step .. step + steps_per_update - 1` on it."""
        algo = self.cfg.algo
        prompts = [self.train_prompts[i] for i in self.plan.micro_batches(step // self.steps_per_update, rank())[0]]
        started = time.perf_counter()
        completions = self.rollout.generate([p.prompt for p in prompts], SamplingConfig(**algo.sampling))
        rewards, counts = self.score(prompts, completions, algo.verification_reward, algo.nonstop_penalty)
        rewards = torch.tensor(rewards).view(len(prompts), algo.sampling.n)
        rollout_seconds = time.perf_counter() - started
        advantages, keep = group_advantages(rewards, mode=algo.advantage)
        if not algo.drop_zero_variance_groups:
            keep = torch.ones_like(keep)
        samples = policy_samples(completions, advantages, keep)
        started = time.perf_counter()
        kept = all_reduce_sum([float(len(samples))])[0]
        metrics = self.update(samples, step) if kept else {}
        if kept:
            self.rollout.sync_weights(self.engine)
        if algo.reference_refresh_every and self.reference is not None:
            if (step + self.steps_per_update) // algo.reference_refresh_every > step // algo.reference_refresh_every:
                self.refresh_reference()
        train_seconds = time.perf_counter() - started
        names = ["reward_sum", "reward_sq", "samples", "kept_groups", *counts]
        values = [float(rewards.sum()), float((rewards**2).sum()), float(rewards.numel()), float(keep.sum())]
        totals = dict(zip(names, all_reduce_sum(values + [float(v) for v in counts.values()])))
        samples_all, mean = totals["samples"], totals["reward_sum"] / totals["samples"]
        return {
            "reward_mean": mean,
            "reward_std": max(totals["reward_sq"] / samples_all - mean**2, 0.0) ** 0.5,
            "accuracy": totals["verified"] / samples_all,
            "response_length": totals["response_tokens"] / samples_all,
            "truncated_fraction": totals["truncated"] / samples_all,
            "groups_kept_fraction": totals["kept_groups"] / (samples_all / algo.sampling.n),
            "verifier_errors": totals["verifier_errors"],
            "verifier_timeouts": totals["verifier_timeouts"],
            "lr": backend.current_lr(self.engine),
            "grad_norm": backend.grad_norm(self.engine) if kept else 0.0,
            "rollout_seconds": rollout_seconds,
            "train_seconds": train_seconds,
            **metrics,
        }

    def score(self, prompts, completions, reward: float, nonstop_penalty: float) -> tuple[list[float], dict]:
        """Verifier rewards of the completions (of prompts[c.prompt_index]) and counts for the metrics."""
        rows = [{"verifier": prompts[c.prompt_index].verifier, "ground_truth": prompts[c.prompt_index].ground_truth}
                for c in completions]  # fmt: skip
        finished = [c.finish_reason == "stop" for c in completions]
        texts = [c.text for c in completions]
        rewards, counts = score_batch(rows, texts, finished, reward, nonstop_penalty, self.cfg.algo.verifier_timeout_s)
        return rewards, {
            "verified": sum(r >= reward for r in rewards),
            "truncated": sum(not f for f in finished),
            "response_tokens": sum(len(c.token_ids) for c in completions),
            "verifier_errors": counts["error"],
            "verifier_timeouts": counts["timeout"],
        }

    def update(self, samples: list[PolicySample], step: int) -> dict[str, float]:
        """Old and reference log-probs, then the update's optimizer steps over the rollout batch."""
        algo, size = self.cfg.algo, self.cfg.train.micro_batch_size
        temperature = algo.sampling.temperature
        examples, prompts = [s.example for s in samples], [s.prompt_length for s in samples]
        self.engine.eval()  # log-prob recomputation must match training forwards (no dropout either way)
        if self.steps_per_update > 1:  # else the step's own log-probs, detached, are the old ones (ratio 1)
            rows = completion_logprob_rows(self.engine, examples, prompts, size, temperature)
            for sample, row in zip(samples, rows):
                sample.old_logprobs = row
        if algo.kl_beta != 0.0:
            reference = self.reference if self.reference is not None else self.engine
            with self.engine.module.policy.disable_adapter() if self.reference is None else contextlib.nullcontext():
                rows = completion_logprob_rows(reference, examples, prompts, size, temperature)
            for sample, row in zip(samples, rows):
                sample.reference_logprobs = row
        self.engine.train()
        metrics: dict[str, float] = {}
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + step)
        for _ in range(algo.epochs_per_batch):
            order = [samples[i] for i in torch.randperm(len(samples), generator=generator).tolist()]
            for minibatch in split_evenly(order, algo.minibatches_per_epoch):
                metrics = self.optimizer_step(minibatch)
        return metrics

    def optimizer_step(self, minibatch: list[PolicySample]) -> dict[str, float]:
        """One optimizer step over `minibatch`, in train.gradient_accumulation_steps chunks (an empty chunk runs a
        zero-loss forward, so every rank does the same number of backward passes)."""
        cfg, algo, engine = self.cfg, self.cfg.algo, self.engine
        tokens = float(sum(len(s.example.input_ids) - s.prompt_length for s in minibatch))
        total_tokens, total_sequences = all_reduce_sum([tokens, float(len(minibatch))])
        sums = {"clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0}
        loss_fn = POLICY_LOSSES.get("grpo")
        for chunk in split_evenly(minibatch, cfg.train.gradient_accumulation_steps):
            if not chunk:
                eos = self.tokenizer.eos_token_id
                logprobs, _, _ = completion_logprobs(engine, [TokenizedExample([eos, eos], [IGNORE_INDEX, eos])], [1])
                engine.backward(logprobs.sum() * 0.0, scale_wrt_gas=False)
                backend.step(engine, cfg.optim.max_grad_norm)
                continue
            logprobs, entropy, mask = completion_logprobs(
                engine, [s.example for s in chunk], [s.prompt_length for s in chunk], algo.sampling.temperature
            )
            old = [s.old_logprobs for s in chunk]
            loss, parts = loss_fn(
                logprobs,
                logprobs.detach() if old[0] is None else padded_rows(old, mask),
                torch.tensor([s.advantage for s in chunk], device=mask.device),
                mask,
                clip_low=algo.clip_low,
                clip_high=algo.clip_high,
                reference_logprobs=padded_rows([s.reference_logprobs for s in chunk], mask) if algo.kl_beta else None,
                kl_beta=algo.kl_beta,
                kl_estimator=algo.kl_estimator,
                entropy=entropy,
                entropy_coef=algo.entropy_coef,
                aggregation=algo.aggregation,
                constant_normalizer=algo.sampling.max_tokens * total_sequences,
            )
            chunk_tokens = float(mask.sum())
            weight = chunk_loss_weight(
                algo.aggregation, len(chunk), chunk_tokens, total_sequences, total_tokens, world_size()
            )
            engine.backward(loss * weight, scale_wrt_gas=False)
            backend.step(engine, cfg.optim.max_grad_norm)
            for key in ("clip_fraction", "kl", "entropy"):
                sums[key] += float(parts.get(key, 0.0)) * chunk_tokens
            sums["tokens"] += chunk_tokens
        totals = dict(zip(sums, all_reduce_sum(list(sums.values()))))
        keys = ("clip_fraction", "entropy", "kl") if algo.kl_beta else ("clip_fraction", "entropy")
        return {key: totals[key] / max(totals["tokens"], 1.0) for key in keys}

    def evaluate(self) -> dict[str, float]:
        """Verified accuracy on the held-out prompts: `eval_greedy_accuracy` always; with eval.samples > 0 also
        `eval_sampled_accuracy` (pass@1 over those samples). `eval_accuracy` is the sampled one when sampled."""
        if not self.eval_prompts:
            return {}
        result = {"eval_greedy_accuracy": self.verified_fraction(greedy_eval_request(self.cfg.eval))}
        result["eval_accuracy"] = result["eval_greedy_accuracy"]
        if self.cfg.eval.samples > 0:
            sampled = self.verified_fraction(sampled_eval_request(self.cfg.eval))
            result["eval_sampled_accuracy"] = result["eval_accuracy"] = sampled
        return result

    def verified_fraction(self, sampling: SamplingConfig) -> float:
        """Fraction of completions (all ranks) of the held-out prompts under `sampling` that verify."""
        mine = self.eval_prompts[rank() :: world_size()]
        correct, samples = 0.0, 0.0
        if mine:
            completions = self.rollout.generate([p.prompt for p in mine], sampling)
            rewards, _ = self.score(mine, completions, 1.0, 0.0)
            correct, samples = float(sum(r >= 1.0 for r in rewards)), float(len(completions))
        total_correct, total = all_reduce_sum([correct, samples])
        return total_correct / max(total, 1.0)

    def refresh_reference(self) -> None:
        """Copy the current policy into the frozen reference (a "dynamic anchor")."""
        state = hf_state_dict(self.engine.module.policy, self.cfg.deepspeed.zero_stage, all_ranks=True)
        target = self.reference.module if hasattr(self.reference, "module") else self.reference
        with gathered_parameters(target.policy, self.cfg.deepspeed.zero_stage):
            target.policy.load_state_dict(state)

    def export(self, out_dir: Path) -> None:
        export_hf(self.engine.module.policy, self.tokenizer, out_dir, self.cfg.deepspeed.zero_stage)
