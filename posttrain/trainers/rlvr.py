"""RL with verifiable rewards: GRPO-family policy optimisation on the shared rollout service.

One update = one rollout batch: sample G completions for each prompt (RolloutService), score them with the
row's verifier, turn rewards into group advantages (dynamic sampling drops zero-variance groups and may sample
more prompts; overlong completions can be masked or penalised: posttrain.rollout.groups), recompute the old log-probs
with the trainer (skipped when the update is one optimizer step: they are then the step's own, detached), take
`epochs_per_batch x minibatches_per_epoch` clipped policy-gradient optimizer steps (token or sequence ratios, the
rollout/trainer mismatch corrected and measured from the engine's log-probs), sync the engine's weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.config import greedy_eval_request, sampled_eval_request
from posttrain.data.batching import StepPlan, split_evenly
from posttrain.data.loading import load_rows
from posttrain.data.prompts import build_prompt_rows, drop_long_prompts
from posttrain.engine import backend
from posttrain.engine.distributed import all_reduce_sum, rank, world_size
from posttrain.engine.export import export_hf
from posttrain.engine.reference import frozen_model
from posttrain.errors import ConfigError
from posttrain.losses import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.losses.policy import AGGREGATIONS, IMPORTANCE_LEVELS, chunk_loss_weight
from posttrain.losses.rollout_correction import MISMATCH_SUMS, corrected_policy_loss, mismatch_metrics
from posttrain.models.logprobs import completion_logprob_rows, completion_logprobs, idle_example, padded_rows
from posttrain.models.reference import (
    reference_logprob_rows,
    refresh_reference,
    restore_reference_weights,
    save_reference_weights,
)
from posttrain.rewards import VERIFIERS
from posttrain.rewards.reward import rollout_reward_metrics, verified_fraction
from posttrain.rollout.config import SamplingConfig
from posttrain.rollout.rl_groups import rl_option_problems, sample_training_groups
from posttrain.rollout.samples import PolicySample, grouped_by_prompt, lora_rank, rollout_model_dir
from posttrain.rollout.service import build_rollout_service
from posttrain.trainers import register_algo
from posttrain.training import (
    Run,
    build_engine,
    crossed,
    idle_micro_step,
    micro_steps,
    policy_module,
    step_micro_batches,
    total_optimizer_steps,
)

log = logging.getLogger("posttrain")


@dataclass
class RLVRAlgoConfig:
    """GRPO-family RL with verifiable rewards (REFERENCE.md section 4). One update = one rollout batch, which
    gives epochs_per_batch x minibatches_per_epoch optimizer steps (train.max_steps counts optimizer steps)."""

    name: str = "rlvr"
    prompts_per_step: int = 16  # prompts per rollout batch, over all ranks
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=8, temperature=1.0, max_tokens=64))
    advantage: str = "standard"  # standard: (r - mean) / (std + eps) | centered: r - mean
    # off | filter: drop zero-variance groups | oversample: then up to max_extra_rounds rounds of ceil(missing x
    # oversample_factor) more prompts until prompts_per_step informative groups (DAPO dynamic sampling)
    dynamic_sampling: str = "filter"
    max_extra_rounds: int = 3
    oversample_factor: float = 1.0
    importance_level: str = "token"  # token: GRPO ratios | sequence: GSPO (one length-normalised ratio per sequence)
    # off | mask: truncated completions leave the loss | soft_penalty: DAPO's reward penalty, 0 up to max_tokens -
    # overlong_buffer, linear to -overlong_penalty_factor (reward units) at max_tokens
    overlong: str = "off"
    overlong_buffer: int = 16
    overlong_penalty_factor: float = 1.0
    rollout_correction: str = "off"  # off | tis (token weights min(ratio, C)) | mis (mask sequences outside [1/C, C])
    rollout_correction_cap: float = 2.0  # C
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
    # Training and scoring forwards hold each group's prompt once for its G completions (same log-probs, fewer
    # tokens through the model), where the attention supports it (sdpa: `shared_prompt_attention`); else off.
    share_prompts: bool = True


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
        f"train.max_tokens_per_micro_batch={cfg.train.max_tokens_per_micro_batch} is below data.max_length + "
        f"algo.sampling.max_tokens (prompt + completion = {cfg.data.max_length + algo.sampling.max_tokens}): a "
        "sequence would not fit one micro-batch": (
            cfg.train.max_tokens_per_micro_batch is not None
            and cfg.train.max_tokens_per_micro_batch < cfg.data.max_length + algo.sampling.max_tokens
        ),
    }
    problems += [problem for problem, failed in checks.items() if failed]
    problems += rl_option_problems(algo)
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
        self.reference_refreshed = False  # once refreshed, every checkpoint holds the reference's weights
        if run.checkpoint is not None and self.reference is not None:
            zero_stage = cfg.deepspeed.zero_stage
            self.reference_refreshed = restore_reference_weights(self.reference, run.checkpoint, zero_stage)
        self.share_prompts = cfg.algo.share_prompts and module.shares_prompts
        if cfg.algo.share_prompts and not self.share_prompts:
            log.info(
                "algo.share_prompts: off, the attention (%s) cannot hold a prompt once for several completions; "
                "each completion's forward carries its own prompt", module.policy.config._attn_implementation,
            )  # fmt: skip
        model_dir = rollout_model_dir(cfg, run.run_dir, self.engine.module.policy, self.tokenizer)
        self.rollout = build_rollout_service(cfg.rollout, model_dir, self.tokenizer, lora_rank(cfg))
        self.rollout.sync_weights(self.engine)  # the engine may hold older weights than the trainer (resume)
        log.info(
            "RLVR: %d train / %d eval prompts, %d rollout batches of %d prompts x %d samples, %d optimizer steps each",
            len(self.train_prompts), len(self.eval_prompts), self.total_steps // self.steps_per_update,
            cfg.algo.prompts_per_step, cfg.algo.sampling.n, self.steps_per_update,
        )  # fmt: skip

    def train_step(self, step: int) -> dict[str, float]:
        """One rollout batch and the optimizer steps `step .. step + steps_per_update - 1` on it."""
        algo, update = self.cfg.algo, step // self.steps_per_update
        started = time.perf_counter()
        first = self.plan.micro_batches(update, rank())[0]
        groups = sample_training_groups(
            self.rollout, self.train_prompts, first, algo, self.cfg.seed, update, self.cfg.rollout.seed
        )
        samples, rollout_seconds = groups.samples, time.perf_counter() - started
        started = time.perf_counter()
        kept = all_reduce_sum([float(len(samples))])[0]
        metrics = {}
        if kept:
            with self.rollout.released(sync_from=self.engine):  # engine asleep for the update, then synced
                metrics = self.update(samples, step)
        if self.reference is not None and crossed(
            step + self.steps_per_update, self.steps_per_update, algo.reference_refresh_every
        ):
            refresh_reference(self.reference, self.engine.module.policy, self.cfg.deepspeed.zero_stage)
            self.reference_refreshed = True
        train_seconds = time.perf_counter() - started
        return {
            **rollout_reward_metrics(groups.rewards, float(groups.kept_groups), groups.counts, algo.sampling.n),
            **groups.stats,
            "lr": backend.current_lr(self.engine),
            "grad_norm": backend.grad_norm(self.engine) if kept else 0.0,
            "rollout_seconds": rollout_seconds,
            "train_seconds": train_seconds,
            **metrics,
        }

    def update(self, samples: list[PolicySample], step: int) -> dict[str, float]:
        """Old and reference log-probs, then the update's optimizer steps over the rollout batch."""
        algo, size = self.cfg.algo, self.cfg.train.micro_batch_size
        budget = self.cfg.train.max_tokens_per_micro_batch  # the no-grad passes keep the training forwards' bound
        temperature = algo.sampling.temperature
        examples, prompts = [s.example for s in samples], [s.prompt_length for s in samples]
        self.engine.eval()  # log-prob recomputation must match training forwards (no dropout either way)
        if self.steps_per_update > 1:  # else the step's own log-probs, detached, are the old ones (ratio 1)
            rows = completion_logprob_rows(
                self.engine, examples, prompts, size, temperature, budget, self.share_prompts
            )
            for sample, row in zip(samples, rows):
                sample.old_logprobs = row
        if algo.kl_beta != 0.0:
            rows = reference_logprob_rows(
                self.reference, self.engine, examples, prompts, size, temperature, budget, self.share_prompts
            )
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
        """One optimizer step over `minibatch`, in train.gradient_accumulation_steps chunks or, with
        train.max_tokens_per_micro_batch, in chunks of at most that many tokens; each chunk's loss weighs its share
        of the aggregation's normaliser over the whole minibatch (`chunk_loss_weight`). Every rank runs as many
        micro-steps (`micro_steps`: zero-weight ones where it has fewer chunks)."""
        cfg, algo, engine = self.cfg, self.cfg.algo, self.engine
        tokens = float(sum(len(s.example.input_ids) - s.prompt_length for s in minibatch))
        total_tokens, total_sequences = all_reduce_sum([tokens, float(len(minibatch))])
        if self.share_prompts:  # a group's samples in one micro-batch put their prompt in the forward once
            minibatch = grouped_by_prompt(minibatch)
        sums = dict.fromkeys(("clip_fraction", "kl", "entropy", *MISMATCH_SUMS), 0.0)
        loss_fn = POLICY_LOSSES.get(IMPORTANCE_LEVELS[algo.importance_level])
        micro_batches = step_micro_batches(
            split_evenly(minibatch, cfg.train.gradient_accumulation_steps), lambda s: (len(s.example.input_ids),),
            cfg.train.max_tokens_per_micro_batch, padded=False,  # completion_logprobs packs its forward
        )  # fmt: skip
        for chunk, weight in micro_steps(engine, micro_batches):  # weight 0: an idle micro-step (ZeRO-3)
            if chunk is None:  # no sequence on this rank at all
                idle_micro_step(engine, self.stand_in_loss, cfg.optim.max_grad_norm)
                continue
            logprobs, entropy, mask = completion_logprobs(
                engine, [s.example for s in chunk], [s.prompt_length for s in chunk], algo.sampling.temperature,
                self.share_prompts,
            )  # fmt: skip
            old = [s.old_logprobs for s in chunk]
            loss, parts, mismatch = corrected_policy_loss(
                loss_fn, logprobs, logprobs.detach() if old[0] is None else padded_rows(old, mask),
                padded_rows([torch.tensor(s.rollout_logprobs) for s in chunk], mask),
                torch.tensor([s.advantage for s in chunk], device=mask.device), mask,
                correction=algo.rollout_correction, cap=algo.rollout_correction_cap,
                clip_low=algo.clip_low, clip_high=algo.clip_high, kl_beta=algo.kl_beta, kl_estimator=algo.kl_estimator,
                reference_logprobs=padded_rows([s.reference_logprobs for s in chunk], mask) if algo.kl_beta else None,
                entropy=entropy, entropy_coef=algo.entropy_coef, aggregation=algo.aggregation,
                constant_normalizer=algo.sampling.max_tokens * total_sequences,
            )  # fmt: skip
            chunk_tokens = float(mask.sum())
            share = chunk_loss_weight(
                algo.aggregation, len(chunk), chunk_tokens, total_sequences, total_tokens, world_size()
            )
            engine.backward(loss * share * weight, scale_wrt_gas=False)
            backend.step(engine, cfg.optim.max_grad_norm)
            if not weight:
                continue
            for key in ("clip_fraction", "kl", "entropy"):
                sums[key] += float(parts.get(key, 0.0)) * chunk_tokens
            sums.update({key: sums[key] + value for key, value in mismatch.items()})
        totals = dict(zip(sums, all_reduce_sum(list(sums.values()))))
        keys = ("clip_fraction", "entropy", "kl") if algo.kl_beta else ("clip_fraction", "entropy")
        return {**{key: totals[key] / max(totals["tokens"], 1.0) for key in keys}, **mismatch_metrics(totals)}

    def stand_in_loss(self) -> torch.Tensor:
        """The policy forward on `idle_example`, for `idle_micro_step`: the policy losses reach both outputs,
        log-probs and entropy (an entropy coefficient of 0 still keeps it in the graph), so the stand-in does too."""
        example = idle_example(self.tokenizer.eos_token_id)
        logprobs, entropy, _ = completion_logprobs(self.engine, [example], [1], share_prompts=self.share_prompts)
        return logprobs.sum() + entropy.sum()

    def evaluate(self) -> dict[str, float]:
        """Verified accuracy on the held-out prompts: `eval_greedy_accuracy` always; with eval.samples > 0 also
        `eval_sampled_accuracy` (pass@1 over those samples). `eval_accuracy` is the sampled one when sampled."""
        if not self.eval_prompts:
            return {}
        timeout = self.cfg.algo.verifier_timeout_s
        greedy = verified_fraction(self.rollout, self.eval_prompts, greedy_eval_request(self.cfg.eval), timeout)
        result = {"eval_greedy_accuracy": greedy, "eval_accuracy": greedy}
        if self.cfg.eval.samples > 0:
            sampled = verified_fraction(self.rollout, self.eval_prompts, sampled_eval_request(self.cfg.eval), timeout)
            result["eval_sampled_accuracy"] = result["eval_accuracy"] = sampled
        return result

    def save_extra(self, directory: Path) -> None:
        """A checkpoint holds the reference once it was refreshed (a resumed run must not restart from the original)."""
        if self.reference_refreshed:
            save_reference_weights(self.reference, directory, self.cfg.deepspeed.zero_stage)

    def export(self, out_dir: Path) -> None:
        export_hf(self.engine.module.policy, self.tokenizer, out_dir, self.cfg.deepspeed.zero_stage)
