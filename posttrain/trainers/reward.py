"""Reward model training (`algo=rm`): Bradley-Terry (head=bt) or the General Preference Model (head=gpm).

Each micro-batch runs chosen and rejected responses in one forward (`collate_pairs`); the head reads the last
token of each (and, for the GPM gate, the last prompt token); the loss is the head's member of
posttrain.losses.REWARD_MODEL_LOSSES. With `peft=lora` the decoder trains through LoRA adapters while the
head (and gate) train in full; `final/` then holds the merged model. `final/` is a reward-model directory that
`posttrain.models.reward.load_reward_model` (and, for the decoder + head, transformers'
AutoModelForSequenceClassification) loads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.batching import StepPlan
from posttrain.data.preference import PairBatch, collate_pairs
from posttrain.engine import backend
from posttrain.engine.distributed import all_reduce_sum, barrier, is_main_process, rank, rank_share, world_size
from posttrain.engine.export import gathered_parameters
from posttrain.losses import REWARD_MODEL_LOSSES
from posttrain.models.reward import RewardHeadConfig, build_reward_model, pair_scores, save_reward_model
from posttrain.trainers import register_algo
from posttrain.training import (
    Run,
    build_engine,
    load_preference_data,
    micro_steps,
    pair_loss_scale,
    pair_micro_batches,
    total_optimizer_steps,
)

log = logging.getLogger("posttrain")


@dataclass
class RewardAlgoConfig:
    """Reward model: Bradley-Terry (head=bt, a scalar) or the General Preference Model (head=gpm)."""

    name: str = "rm"
    head: str = "bt"  # bt | gpm
    embed_dim: int = 8  # gpm: 2k, the preference embedding size (even)
    normalize: bool = True  # gpm: L2-normalise the embedding
    prompt_gate: bool = False  # gpm: lambda(x) = softmax(W_p h_prompt) scales the k blocks
    tau: float = 0.1  # gpm: P(y_i > y_j) = sigma(s / tau)
    margin: float = 0.0  # bt and gpm: loss on (score - margin)


def head_config(algo) -> RewardHeadConfig:
    return RewardHeadConfig(
        head=algo.head, embed_dim=algo.embed_dim, normalize=algo.normalize, prompt_gate=algo.prompt_gate, tau=algo.tau
    )


def check_config(cfg) -> None:
    REWARD_MODEL_LOSSES.get(cfg.algo.head, "algo.head")
    head_config(cfg.algo)  # a bad embed_dim / gate combination fails now, before any data is read


@register_algo("rm", schema=RewardAlgoConfig, curve=("accuracy", "loss"), check=check_config)
class RewardModelTrainer:
    def __init__(self, run: Run):
        cfg = self.cfg = run.cfg
        self.train_examples, self.eval_examples = load_preference_data(run)
        self.tokenizer = run.tokenizer
        run.commit()
        model = build_reward_model(cfg.model, self.tokenizer, cfg.seed, head_config(cfg.algo), cfg.peft)
        train = cfg.train
        self.plan = StepPlan(
            train.micro_batch_size, train.gradient_accumulation_steps, world_size(), len(self.train_examples), cfg.seed
        )
        self.steps_per_update = 1
        self.total_steps = total_optimizer_steps(self.plan, train)
        self.engine = build_engine(run, model, self.total_steps)
        self.loss_fn = REWARD_MODEL_LOSSES.get(cfg.algo.head)
        log.info(
            "reward model (%s): %d train / %d eval pairs, %d steps, effective batch %d pairs (micro %d x accum %d x "
            "world %d)", cfg.algo.head, len(self.train_examples), len(self.eval_examples), self.total_steps,
            self.plan.examples_per_step, self.plan.micro_batch_size, self.plan.gradient_accumulation_steps,
            self.plan.world_size,
        )  # fmt: skip

    def head_outputs(self, pairs: list) -> tuple:
        """(chosen values [B, D], rejected values [B, D], gate [B, k] or None) from ONE forward over the pairs."""
        batch: PairBatch = collate_pairs(pairs, self.cfg.data.packing, self.tokenizer.pad_token_id)
        batch = batch.to(self.engine.device)
        values, gate = self.engine(
            batch.inputs["input_ids"], batch.last_index, batch.prompt_index,
            position_ids=batch.inputs["position_ids"], attention_mask=batch.inputs.get("attention_mask"),
        )  # fmt: skip
        n = batch.num_pairs
        return values[:n], values[n:], None if gate is None else gate[:n]  # one prompt: one gate per pair

    def loss(self, chosen, rejected, gate):
        return self.loss_fn(chosen, rejected, gate, margin=self.cfg.algo.margin, tau=self.cfg.algo.tau)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (fixed-size, or packed under
        train.max_tokens_per_micro_batch); metrics are pair-weighted means over the step."""
        lr = backend.current_lr(self.engine)
        started = time.perf_counter()
        totals = [0.0, 0.0, 0.0, 0.0]  # loss * pairs, accuracy * pairs, pairs, tokens
        micro_batches = pair_micro_batches(self.plan.micro_batches(step, rank()), self.train_examples, self.cfg)
        for indices, weight in micro_steps(self.engine, micro_batches):  # weight 0: an idle micro-step (ZeRO-3)
            pairs = [self.train_examples[i] for i in indices]
            loss, metrics = self.loss(*self.head_outputs(pairs))
            self.engine.backward(loss * pair_loss_scale(len(indices), self.plan) * weight, scale_wrt_gas=False)
            backend.step(self.engine, self.cfg.optim.max_grad_norm)
            totals[0] += float(metrics["loss"]) * len(indices) * weight
            totals[1] += float(metrics["accuracy"]) * len(indices) * weight
            totals[2] += len(indices) * weight
            totals[3] += sum(pair.num_tokens for pair in pairs) * weight
        elapsed = time.perf_counter() - started
        loss, accuracy, pairs, tokens = all_reduce_sum(totals)
        return {
            "loss": loss / pairs, "accuracy": accuracy / pairs, "lr": lr,
            "grad_norm": backend.grad_norm(self.engine), "tokens_per_second": tokens / elapsed,
        }  # fmt: skip

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out pair accuracy: s(chosen > rejected) > 0, an exact tie counting 1/2; and the mean loss."""
        if not self.eval_examples:
            return {}
        self.engine.eval()
        mine, real = rank_share(self.eval_examples)  # equal forward counts on every rank; padding pairs weigh 0
        totals = [0.0, 0.0, 0.0]  # loss * pairs, accuracy, pairs
        size = self.cfg.train.micro_batch_size
        for start in range(0, len(mine), size):
            pairs, weights = mine[start : start + size], torch.tensor(real[start : start + size], dtype=torch.float)
            chosen, rejected, gate = self.head_outputs(pairs)
            for i in range(len(pairs)):
                loss, _ = self.loss(*(None if t is None else t[i : i + 1] for t in (chosen, rejected, gate)))
                totals[0] += float(loss) * float(weights[i])
            scores = pair_scores(chosen, rejected, gate, self.cfg.algo.head).float().cpu()
            totals[1] += float((((scores > 0).float() + 0.5 * (scores == 0).float()) * weights).sum())
            totals[2] += float(weights.sum())
        self.engine.train()
        loss, accuracy, pairs = all_reduce_sum(totals)
        return {"eval_loss": loss / pairs, "eval_accuracy": accuracy / pairs}

    def export(self, out_dir: Path) -> None:
        """A reward-model directory (weights gathered under ZeRO-3, written by rank 0)."""
        model = self.engine.module
        with gathered_parameters(model, self.cfg.deepspeed.zero_stage):
            state = (
                {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
                if is_main_process()
                else None
            )
        if is_main_process():
            save_reward_model(model, self.tokenizer, out_dir, state)
        barrier()
