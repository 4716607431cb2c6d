"""Supervised fine-tuning: assistant-only cross-entropy with a step-wide token-weighted reduction."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.batching import StepPlan, collate, count_target_tokens
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.data.loading import load_rows
from posttrain.data.sft import build_sft_examples
from posttrain.engine import backend
from posttrain.engine.distributed import all_reduce_max, all_reduce_sum, rank, rank_share, world_size
from posttrain.engine.export import export_hf
from posttrain.errors import ConfigError
from posttrain.losses.sft import REDUCTIONS, sft_loss, sft_loss_scale
from posttrain.trainers import register_algo
from posttrain.training import (
    Run,
    batch_to,
    build_engine,
    micro_steps,
    policy_module,
    step_micro_batches,
    total_optimizer_steps,
)

log = logging.getLogger("posttrain")


@dataclass
class SFTAlgoConfig:
    name: str = "sft"
    # token_mean: sum of token losses / number of target tokens in the whole optimizer step, so the
    # micro-batch size never changes the gradient. sum: summed token losses (Tülu 3's published lr).
    loss_reduction: str = "token_mean"


def check_config(cfg) -> None:
    if cfg.algo.loss_reduction not in REDUCTIONS:
        raise ConfigError(f"algo.loss_reduction={cfg.algo.loss_reduction!r} must be one of {', '.join(REDUCTIONS)}")


def conversation_texts(rows) -> list[str]:
    """Message contents of every well-formed-looking row (tokenizer training text)."""
    texts = []
    for source_row in rows:
        messages = source_row.row.get("messages") if isinstance(source_row.row, dict) else None
        for message in messages if isinstance(messages, list) else []:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                texts.append(message["content"])
    return texts


@register_algo("sft", schema=SFTAlgoConfig, curve=("loss",), check=check_config)
class SFT:
    def __init__(self, run: Run):
        cfg = self.cfg = run.cfg
        train_rows, eval_rows = load_rows(cfg.data, "train"), load_rows(cfg.data, "eval")
        self.tokenizer = run.load_tokenizer(conversation_texts(train_rows))
        self.train_examples, _ = build_sft_examples(train_rows, self.tokenizer, cfg.data, "train")
        self.eval_examples = build_sft_examples(eval_rows, self.tokenizer, cfg.data, "eval")[0] if eval_rows else []
        run.commit()
        train = cfg.train
        self.plan = StepPlan(
            train.micro_batch_size, train.gradient_accumulation_steps, world_size(), len(self.train_examples), cfg.seed
        )
        self.steps_per_update = 1
        self.total_steps = total_optimizer_steps(self.plan, train)
        self.engine = build_engine(run, policy_module(run), self.total_steps)
        log.info(
            "SFT: %d train / %d eval examples, %d steps, effective batch %d (micro %d x accum %d x world %d)",
            len(self.train_examples), len(self.eval_examples), self.total_steps, self.plan.examples_per_step,
            self.plan.micro_batch_size, self.plan.gradient_accumulation_steps, self.plan.world_size,
        )  # fmt: skip

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (fixed-size, or packed under
        train.max_tokens_per_micro_batch: the token-mean loss divides by the step's target tokens either way);
        returns the step's metrics."""
        cfg, engine = self.cfg, self.engine
        step_target_tokens = count_target_tokens([self.train_examples[i] for i in self.plan.step_indices(step)])
        lr = backend.current_lr(engine)
        started = time.perf_counter()
        nll_sum, local_tokens = 0.0, 0
        micro_batches = step_micro_batches(
            self.plan.micro_batches(step, rank()),
            lambda i: (len(self.train_examples[i].input_ids),),
            cfg.train.max_tokens_per_micro_batch,
            padded=not cfg.data.packing,
        )
        for indices, weight in micro_steps(engine, micro_batches):  # weight 0: an idle micro-step (ZeRO-3)
            examples = [self.train_examples[i] for i in indices]
            batch = batch_to(collate(examples, cfg.data.packing, self.tokenizer.pad_token_id), engine.device)
            targets = batch.pop("targets")
            micro_nll_sum, loss = self.micro_batch_loss(targets, batch, step_target_tokens)
            engine.backward(loss * weight, scale_wrt_gas=False)
            backend.step(engine, cfg.optim.max_grad_norm)
            nll_sum += float(micro_nll_sum) * weight
            local_tokens += weight * int(
                batch["input_ids"].numel() if cfg.data.packing else batch["attention_mask"].sum()
            )
        elapsed = time.perf_counter() - started
        total_nll, total_tokens = all_reduce_sum([nll_sum, float(local_tokens)])
        most, fewest = all_reduce_max([float(len(micro_batches)), -float(len(micro_batches))])
        return {
            "loss": total_nll / step_target_tokens,
            "lr": lr,
            "grad_norm": backend.grad_norm(engine),
            "tokens_per_second": total_tokens / elapsed,
            "target_tokens": float(step_target_tokens),
            # forwards a rank ran / had work for: they differ under train.max_tokens_per_micro_batch
            "micro_batches": most,
            "micro_batches_fewest": -fewest,
        }

    def micro_batch_loss(self, targets, batch, step_target_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(detached summed NLL of the micro-batch's targets, its loss scaled for the step; `sft_loss`).

        With model.fused_logprobs and model.fused_cross_entropy the summed NLL comes from the loss-fused kernel
        (target mask as token weights: it forms the head's gradients in the forward, and the step scale and the
        micro-batch weight reach them as the upstream gradient); otherwise from per-token log-probs."""
        cfg = self.cfg
        target_mask = (targets != IGNORE_INDEX).float()
        if cfg.model.fused_logprobs and cfg.model.fused_cross_entropy:
            summed_nll = self.engine(targets=targets, token_weights=target_mask, **batch)
            scale = sft_loss_scale(
                step_target_tokens=step_target_tokens, reduction=cfg.algo.loss_reduction, world_size=world_size()
            )
            return summed_nll.detach(), summed_nll * scale
        logprobs, _ = self.engine(targets=targets, **batch)
        loss, parts = sft_loss(
            logprobs,
            target_mask,
            step_target_tokens=step_target_tokens,
            reduction=cfg.algo.loss_reduction,
            world_size=world_size(),
        )
        return parts["nll_sum"], loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-mean NLL over the eval examples (each rank a strided share, padded to equal forward counts)."""
        if not self.eval_examples:
            return {}
        self.engine.eval()
        nll, tokens = 0.0, 0
        size = self.cfg.train.micro_batch_size
        mine, real = rank_share(self.eval_examples)  # equal counts on every rank; padding carries no targets
        mine = [
            e if keep else TokenizedExample(e.input_ids, [IGNORE_INDEX] * len(e.labels)) for e, keep in zip(mine, real)
        ]
        for start in range(0, len(mine), size):
            examples = mine[start : start + size]
            collated = collate(examples, self.cfg.data.packing, self.tokenizer.pad_token_id)
            batch = batch_to(collated, self.engine.device)
            targets = batch.pop("targets")
            logprobs, _ = self.engine(targets=targets, **batch)
            nll -= float((logprobs * (targets != IGNORE_INDEX)).sum())
            tokens += count_target_tokens(examples)
        self.engine.train()
        total_nll, total_tokens = all_reduce_sum([nll, float(tokens)])
        return {"eval_loss": total_nll / max(total_tokens, 1.0)}

    def export(self, out_dir: Path) -> None:
        export_hf(self.engine.module.policy, self.tokenizer, out_dir, self.cfg.deepspeed.zero_stage)
