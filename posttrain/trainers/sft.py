"""Supervised fine-tuning: assistant-only cross-entropy with a step-wide token-weighted reduction.

setup -> (resume) -> train -> save. Data, model, loss, engine and logging come from the library.
"""

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
from posttrain.engine.checkpoint import load_checkpoint, save_checkpoint
from posttrain.engine.distributed import all_reduce_sum, init_distributed, rank, world_size
from posttrain.engine.export import export_hf
from posttrain.logging import MetricsLogger
from posttrain.losses.sft import sft_loss
from posttrain.models.loading import load_model, load_tokenizer
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.lora import wrap_lora
from posttrain.run_dir import resume_point, write_config
from posttrain.training import batch_to, seed_everything, total_optimizer_steps

log = logging.getLogger("posttrain")


@dataclass
class SFTRun:
    cfg: object
    run_dir: Path
    tokenizer: object
    engine: object
    plan: StepPlan
    train_examples: list[TokenizedExample]
    eval_examples: list[TokenizedExample]
    total_steps: int
    start_step: int
    logger: MetricsLogger | None = None


def conversation_texts(rows) -> list[str]:
    """Message contents of every well-formed-looking row (tokenizer training text)."""
    texts = []
    for source_row in rows:
        messages = source_row.row.get("messages") if isinstance(source_row.row, dict) else None
        for message in messages if isinstance(messages, list) else []:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                texts.append(message["content"])
    return texts


def setup(cfg) -> SFTRun:
    init_distributed()
    seed_everything(cfg.seed + rank())
    run_dir = Path(cfg.run_dir)
    checkpoint = resume_point(run_dir, cfg.resume)

    # Read and validate all data before writing anything into the run dir.
    train_rows, eval_rows = load_rows(cfg.data, "train"), load_rows(cfg.data, "eval")
    saved_tokenizer = run_dir / "tokenizer"
    tokenizer = load_tokenizer(
        cfg.model, conversation_texts(train_rows), saved_tokenizer if saved_tokenizer.exists() else None
    )
    train_examples, _ = build_sft_examples(train_rows, tokenizer, cfg.data, "train")
    eval_examples = build_sft_examples(eval_rows, tokenizer, cfg.data, "eval")[0] if eval_rows else []

    write_config(run_dir, cfg)
    if not cfg.model.path and rank() == 0 and not saved_tokenizer.exists():
        tokenizer.save_pretrained(str(saved_tokenizer))

    model = load_model(cfg.model, tokenizer, cfg.seed)
    if cfg.peft.enabled:
        model = wrap_lora(model, cfg.peft)
    module = CausalLMWithLogprobs(model, fused=cfg.model.fused_logprobs, zero_stage=cfg.deepspeed.zero_stage)

    plan = StepPlan(
        cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, world_size(), len(train_examples), cfg.seed
    )
    total_steps = total_optimizer_steps(plan, cfg.train)
    engine = backend.build_engine(module, cfg, total_steps)
    start_step = load_checkpoint(engine, checkpoint)["step"] if checkpoint else 0
    if checkpoint:
        log.info("resumed from %s (step %d)", checkpoint, start_step)
    log.info(
        "SFT: %d train / %d eval examples, %d steps, effective batch %d (micro %d x accum %d x world %d)",
        len(train_examples),
        len(eval_examples),
        total_steps,
        plan.examples_per_step,
        plan.micro_batch_size,
        plan.gradient_accumulation_steps,
        plan.world_size,
    )
    return SFTRun(cfg, run_dir, tokenizer, engine, plan, train_examples, eval_examples, total_steps, start_step)


def train_step(run: SFTRun, step: int) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the step's metrics."""
    cfg, engine = run.cfg, run.engine
    step_examples = [run.train_examples[i] for i in run.plan.step_indices(step)]
    step_target_tokens = count_target_tokens(step_examples)
    lr = backend.current_lr(engine)
    started = time.perf_counter()
    nll_sum, local_tokens = 0.0, 0
    for indices in run.plan.micro_batches(step, rank()):
        examples = [run.train_examples[i] for i in indices]
        batch = batch_to(collate(examples, cfg.data.packing, run.tokenizer.pad_token_id), engine.device)
        targets = batch.pop("targets")
        logprobs, _ = engine(targets=targets, **batch)
        loss, parts = sft_loss(
            logprobs,
            (targets != IGNORE_INDEX).float(),
            step_target_tokens=step_target_tokens,
            reduction=cfg.algo.loss_reduction,
            world_size=world_size(),
        )
        engine.backward(loss, scale_wrt_gas=False)
        backend.step(engine, cfg.optim.max_grad_norm)
        nll_sum += float(parts["nll_sum"])
        local_tokens += int(batch["input_ids"].numel() if cfg.data.packing else batch["attention_mask"].sum())
    elapsed = time.perf_counter() - started
    total_nll, total_tokens = all_reduce_sum([nll_sum, float(local_tokens)])
    return {
        "loss": total_nll / step_target_tokens,
        "lr": lr,
        "grad_norm": backend.grad_norm(engine),
        "tokens_per_second": total_tokens / elapsed,
        "target_tokens": float(step_target_tokens),
    }


@torch.no_grad()
def evaluate(run: SFTRun) -> float:
    """Token-mean NLL over the eval examples (each rank takes a strided share)."""
    run.engine.eval()
    nll, tokens = 0.0, 0
    size = run.cfg.train.micro_batch_size
    mine = run.eval_examples[rank() :: world_size()]
    for start in range(0, len(mine), size):
        examples = mine[start : start + size]
        batch = batch_to(collate(examples, run.cfg.data.packing, run.tokenizer.pad_token_id), run.engine.device)
        targets = batch.pop("targets")
        logprobs, _ = run.engine(targets=targets, **batch)
        nll -= float((logprobs * (targets != IGNORE_INDEX)).sum())
        tokens += count_target_tokens(examples)
    run.engine.train()
    total_nll, total_tokens = all_reduce_sum([nll, float(tokens)])
    return total_nll / max(total_tokens, 1.0)


def save(run: SFTRun, step: int) -> None:
    save_checkpoint(
        run.engine, run.run_dir, step, {"algo": "sft", "total_steps": run.total_steps}, run.cfg.checkpoint.keep_last
    )


def export(run: SFTRun) -> None:
    export_hf(run.engine.module.policy, run.tokenizer, run.run_dir / "final", run.cfg.deepspeed.zero_stage)


def train(run: SFTRun) -> None:
    cfg = run.cfg
    run.logger = MetricsLogger(run.run_dir, cfg.logger, {}, run.total_steps, run.start_step)
    try:
        for step in range(run.start_step, run.total_steps):
            metrics = train_step(run, step)
            done = step + 1
            if run.eval_examples and cfg.train.eval_every and done % cfg.train.eval_every == 0:
                metrics["eval_loss"] = evaluate(run)
            if done % cfg.logger.log_every == 0 or done == run.total_steps:
                run.logger.log(done, metrics)
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
                save(run, done)
        if run.eval_examples:
            run.logger.log(run.total_steps, {"eval_loss": evaluate(run)})
    finally:
        run.logger.close()


def main(cfg) -> Path:
    run = setup(cfg)
    train(run)
    save(run, run.total_steps)
    export(run)
    log.info("done: %s", run.run_dir / "final")
    return run.run_dir
