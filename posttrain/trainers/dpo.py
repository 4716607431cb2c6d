"""Offline preference optimisation: the DPO family (dpo, dpo_norm, simpo, ipo, hinge, wpo).

Each micro-batch scores chosen and rejected responses in one forward (`collate_pairs`); per-sequence log-prob
sums and response lengths go to the loss named by `algo.loss` (posttrain.losses.PAIR_LOSSES). Reference
log-probs are computed once before training and cached on disk, and the reference model is freed
(`posttrain.models.reference`); `algo.reference.cache=false` keeps a live reference, and reference-free
losses (simpo) never build one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.data.batching import StepPlan
from posttrain.data.preference import collate_pairs, first_divergent_step, separator_tokens
from posttrain.engine import backend
from posttrain.engine.distributed import WeightedMeans, all_reduce_sum, rank, rank_share, world_size
from posttrain.engine.export import export_hf
from posttrain.errors import ConfigError
from posttrain.losses import PAIR_LOSSES
from posttrain.losses.dpo import chosen_nll
from posttrain.models.logprobs import pair_logprob_sums
from posttrain.models.reference import build_pair_reference
from posttrain.trainers import register_algo
from posttrain.training import (
    Run,
    build_engine,
    load_preference_data,
    micro_steps,
    pair_loss_scale,
    pair_micro_batches,
    policy_module,
    total_optimizer_steps,
)

log = logging.getLogger("posttrain")

STEP_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
    "logps/rejected", "nll",
)  # fmt: skip


@dataclass
class ReferenceConfig:
    """The frozen reference policy of the DPO family (unused by reference-free losses such as simpo)."""

    path: str | None = None  # reference model; null: the policy's starting point (model.path / the tiny init)
    cache: bool = True  # compute its log-probs once before training, on disk; false keeps a live reference model
    cache_dir: str | None = None  # null: $POSTTRAIN_CACHE_DIR/reference_logps or ~/.cache/posttrain/reference_logps
    micro_batch_size: int = 16  # pairs per forward while precomputing


@dataclass
class DPOAlgoConfig:
    name: str = "dpo"
    loss: str = "dpo"  # a preference-pair loss: dpo | dpo_norm | simpo | ipo | hinge | wpo
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO's epsilon
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # loss-specific, e.g. {gamma_beta_ratio: 0.3} (simpo)
    # RPO (Pang et al. 2024): + nll_alpha * the chosen response's length-normalised NLL, which keeps the
    # chosen likelihood from falling with the rejected one; 0 = the plain loss (TRL's rpo_alpha)
    nll_alpha: float = 0.0
    # Step-DPO (Lai et al. 2024): score only the first step where chosen and rejected differ, a step ending
    # with this text ("\n": one line); null scores the whole responses
    step_separator: str | None = None
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)


def check_config(cfg) -> None:
    PAIR_LOSSES.get(cfg.algo.loss, "algo.loss")  # a wrong name fails now, naming its family
    if cfg.algo.nll_alpha < 0:
        raise ConfigError(
            f"algo.nll_alpha={cfg.algo.nll_alpha} is negative; it weighs the chosen NLL (RPO): use 0 to turn it off "
            "or a positive weight"
        )
    if cfg.algo.reference.micro_batch_size < 1:
        raise ConfigError(f"algo.reference.micro_batch_size={cfg.algo.reference.micro_batch_size} must be >= 1")


@register_algo("dpo", schema=DPOAlgoConfig, curve=("rewards/accuracy", "loss"), check=check_config)
class DPO:
    def __init__(self, run: Run):
        cfg = self.cfg = run.cfg
        self.train_examples, self.eval_examples = load_preference_data(run)
        self.tokenizer = run.tokenizer
        if cfg.algo.step_separator is not None:
            separators = separator_tokens(self.tokenizer, cfg.algo.step_separator)
            self.train_examples = [first_divergent_step(pair, separators) for pair in self.train_examples]
            self.eval_examples = [first_divergent_step(pair, separators) for pair in self.eval_examples]
        run.commit()
        splits = {"train": self.train_examples, "eval": self.eval_examples}
        self.reference = build_pair_reference(cfg, self.tokenizer, splits)
        train = cfg.train
        self.plan = StepPlan(
            train.micro_batch_size, train.gradient_accumulation_steps, world_size(), len(self.train_examples), cfg.seed
        )
        self.steps_per_update = 1
        self.total_steps = total_optimizer_steps(self.plan, train)
        self.engine = build_engine(run, policy_module(run), self.total_steps)
        log.info(
            "DPO (%s, beta %g): %d train / %d eval pairs, %d steps, effective batch %d pairs (micro %d x accum %d x "
            "world %d)", cfg.algo.loss, cfg.algo.beta, len(self.train_examples), len(self.eval_examples),
            self.total_steps, self.plan.examples_per_step, self.plan.micro_batch_size,
            self.plan.gradient_accumulation_steps, self.plan.world_size,
        )  # fmt: skip

    def pair_inputs(self, split: str, indices: list[int]):
        """(batch, loss inputs) of pairs `indices` of `split`: ONE policy forward over chosen + rejected, the
        reference sums, the response lengths, in the family's argument order."""
        examples = self.train_examples if split == "train" else self.eval_examples
        pairs = [examples[i] for i in indices]
        batch = collate_pairs(pairs, self.cfg.data.packing, self.tokenizer.pad_token_id).to(self.engine.device)
        policy_chosen, policy_rejected = pair_logprob_sums(self.engine, batch)
        reference_chosen, reference_rejected = self.reference.sums(split, indices, batch, self.engine.device)
        lengths, n = batch.response_lengths, batch.num_pairs
        return batch, (policy_chosen, policy_rejected, reference_chosen, reference_rejected, lengths[:n], lengths[n:])

    def family_loss(self, inputs: tuple):
        """`algo.loss` with its hyperparameters plus `algo.nll_alpha` x the chosen NLL (RPO): (loss, metrics).
        `logps/*` are the policy's per-token log-probs: both falling means mass moves to text neither response is."""
        algo = self.cfg.algo
        loss_fn = PAIR_LOSSES.get(algo.loss)
        loss, metrics = loss_fn(*inputs, beta=algo.beta, label_smoothing=algo.label_smoothing, **dict(algo.loss_kwargs))
        nll = chosen_nll(inputs[0], inputs[4])
        if algo.nll_alpha:
            loss = loss + algo.nll_alpha * nll
            metrics["loss"] = loss.detach()
        metrics["nll"] = nll.detach()
        metrics["logps/chosen"] = (inputs[0] / inputs[4]).detach().mean()
        metrics["logps/rejected"] = (inputs[1] / inputs[5]).detach().mean()
        return loss, metrics

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (fixed-size, or packed under
        train.max_tokens_per_micro_batch: each weighs its pairs' share of the step's mean either way); metrics are
        pair-weighted means over the step."""
        lr = backend.current_lr(self.engine)
        started = time.perf_counter()
        means, tokens = WeightedMeans(STEP_METRICS), 0.0
        micro_batches = pair_micro_batches(self.plan.micro_batches(step, rank()), self.train_examples, self.cfg)
        for indices, weight in micro_steps(self.engine, micro_batches):  # weight 0: an idle micro-step (ZeRO-3)
            batch, inputs = self.pair_inputs("train", indices)
            loss, metrics = self.family_loss(inputs)
            self.engine.backward(loss * pair_loss_scale(len(indices), self.plan) * weight, scale_wrt_gas=False)
            backend.step(self.engine, self.cfg.optim.max_grad_norm)
            means.add(metrics, len(indices) * weight)
            inputs_ = batch.inputs
            tokens += weight * float(
                inputs_["input_ids"].numel() if self.cfg.data.packing else inputs_["attention_mask"].sum()
            )
        elapsed = time.perf_counter() - started
        result = means.means()
        result.update(
            lr=lr, grad_norm=backend.grad_norm(self.engine), tokens_per_second=all_reduce_sum([tokens])[0] / elapsed
        )
        return result

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out pairs: mean loss; `eval_accuracy`, the fraction ranked right by the loss's implicit reward
        (an exact tie counts 1/2, so policy = reference at step 0 scores chance); `eval_logp_accuracy`, the
        policy's own preference (mean response log-prob of chosen above rejected)."""
        if not self.eval_examples:
            return {}
        self.engine.eval()
        mine, real = rank_share(range(len(self.eval_examples)))  # equal forward counts; padding pairs weigh 0
        totals = [0.0, 0.0, 0.0, 0.0]  # loss * pairs, accuracy, likelihood accuracy, pairs
        size = self.cfg.train.micro_batch_size
        for start in range(0, len(mine), size):
            indices, weights = mine[start : start + size], torch.tensor(real[start : start + size], dtype=torch.float)
            _, inputs = self.pair_inputs("eval", indices)
            for i in range(len(indices)):  # one pair at a time: its loss and the sign of its implicit-reward margin
                loss, metrics = self.family_loss(tuple(None if t is None else t[i : i + 1] for t in inputs))
                margin = float(metrics["rewards/margin"])
                totals[0] += float(loss) * float(weights[i])
                totals[1] += (1.0 if margin > 0 else 0.5 if margin == 0 else 0.0) * float(weights[i])
            logp_right = (inputs[0] / inputs[4] > inputs[1] / inputs[5]).float().cpu()
            totals[2] += float((logp_right * weights).sum())
            totals[3] += float(weights.sum())
        self.engine.train()
        loss, accuracy, logp_accuracy, pairs = all_reduce_sum(totals)
        return {
            "eval_loss": loss / pairs,
            "eval_accuracy": accuracy / pairs,
            "eval_logp_accuracy": logp_accuracy / pairs,
        }

    def export(self, out_dir: Path) -> None:
        export_hf(self.engine.module.policy, self.tokenizer, out_dir, self.cfg.deepspeed.zero_stage)
