"""Reward model training (`algo=rm`): Bradley-Terry (head=bt) or the General Preference Model (head=gpm).

setup -> (resume) -> train -> save -> export. Each micro-batch runs chosen and rejected responses in one
forward (`collate_pairs`); the head reads the last token of each (and, for the GPM gate, the last prompt
token); the loss is `bt` on scalar rewards or `gpm` on preference embeddings, both from the registry.
`final/` is a reward-model directory that `posttrain.models.reward.load_reward_model` (and, for the
decoder + head, transformers' AutoModelForSequenceClassification) loads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.batching import StepPlan
from posttrain.data.preference import PairBatch, PreferenceExample, collate_pairs
from posttrain.engine import backend
from posttrain.engine.checkpoint import load_checkpoint, save_checkpoint
from posttrain.engine.distributed import all_reduce_sum, barrier, init_distributed, is_main_process, rank, world_size
from posttrain.engine.export import gathered_parameters
from posttrain.errors import ConfigError
from posttrain.logging import MetricsLogger
from posttrain.losses import REWARD_MODEL_LOSSES
from posttrain.models.reward import RewardHeadConfig, build_reward_model, pair_scores, save_reward_model
from posttrain.run_dir import resume_point, write_config
from posttrain.training import load_preference_data, pair_loss_scale, seed_everything, total_optimizer_steps

log = logging.getLogger("posttrain")

STEP_METRICS = ("loss", "accuracy")


@dataclass
class RewardRun:
    cfg: object
    run_dir: Path
    tokenizer: object
    engine: object
    plan: StepPlan
    train_examples: list[PreferenceExample]
    eval_examples: list[PreferenceExample]
    total_steps: int
    start_step: int
    logger: MetricsLogger | None = None


def head_config(algo) -> RewardHeadConfig:
    return RewardHeadConfig(
        head=algo.head, embed_dim=algo.embed_dim, normalize=algo.normalize, prompt_gate=algo.prompt_gate, tau=algo.tau
    )


def setup(cfg) -> RewardRun:
    init_distributed()
    seed_everything(cfg.seed + rank())
    head = head_config(cfg.algo)  # a bad head / embed_dim fails now, before any data is read
    if cfg.peft.enabled:
        raise ConfigError("algo=rm does not support peft yet (the score head must train in full); set peft=none")
    run_dir = Path(cfg.run_dir)
    checkpoint = resume_point(run_dir, cfg.resume)
    tokenizer, train_examples, eval_examples = load_preference_data(cfg, run_dir)

    write_config(run_dir, cfg)
    if not cfg.model.path and rank() == 0 and not (run_dir / "tokenizer").exists():
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    model = build_reward_model(cfg.model, tokenizer, cfg.seed, head)
    plan = StepPlan(
        cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, world_size(), len(train_examples), cfg.seed
    )
    total_steps = total_optimizer_steps(plan, cfg.train)
    engine = backend.build_engine(model, cfg, total_steps)
    start_step = load_checkpoint(engine, checkpoint)["step"] if checkpoint else 0
    if checkpoint:
        log.info("resumed from %s (step %d)", checkpoint, start_step)
    log.info(
        "reward model (%s): %d train / %d eval pairs, %d steps, effective batch %d pairs (micro %d x accum %d x "
        "world %d)",
        cfg.algo.head,
        len(train_examples),
        len(eval_examples),
        total_steps,
        plan.examples_per_step,
        plan.micro_batch_size,
        plan.gradient_accumulation_steps,
        plan.world_size,
    )
    return RewardRun(cfg, run_dir, tokenizer, engine, plan, train_examples, eval_examples, total_steps, start_step)


def head_outputs(run: RewardRun, batch: PairBatch):
    """(chosen values [B, D], rejected values [B, D], gate [B, k] or None) from ONE forward."""
    values, gate = run.engine(
        batch.inputs["input_ids"],
        batch.last_index,
        batch.prompt_index,
        position_ids=batch.inputs["position_ids"],
        attention_mask=batch.inputs.get("attention_mask"),
    )
    pairs = batch.num_pairs
    return values[:pairs], values[pairs:], None if gate is None else gate[:pairs]  # one prompt: one gate per pair


def preference_loss(algo, chosen, rejected, gate):
    """`bt` on scalar rewards or `gpm` on embeddings (posttrain.losses.preference); returns (loss, metrics)."""
    return REWARD_MODEL_LOSSES.get(algo.head, "algo.head")(chosen, rejected, gate, margin=algo.margin, tau=algo.tau)


def train_step(run: RewardRun, step: int) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; metrics are pair-weighted means over the step."""
    lr = backend.current_lr(run.engine)
    started = time.perf_counter()
    totals = [0.0, 0.0, 0.0, 0.0]  # loss * pairs, accuracy * pairs, pairs, tokens
    for indices in run.plan.micro_batches(step, rank()):
        pairs = [run.train_examples[i] for i in indices]
        batch = collate_pairs(pairs, run.cfg.data.packing, run.tokenizer.pad_token_id).to(run.engine.device)
        loss, metrics = preference_loss(run.cfg.algo, *head_outputs(run, batch))
        run.engine.backward(loss * pair_loss_scale(len(indices), run.plan), scale_wrt_gas=False)
        backend.step(run.engine, run.cfg.optim.max_grad_norm)
        totals[0] += float(metrics["loss"]) * len(indices)
        totals[1] += float(metrics["accuracy"]) * len(indices)
        totals[2] += len(indices)
        totals[3] += sum(pair.num_tokens for pair in pairs)
    elapsed = time.perf_counter() - started
    totals = all_reduce_sum(totals)
    return {
        "loss": totals[0] / totals[2],
        "accuracy": totals[1] / totals[2],
        "lr": lr,
        "grad_norm": backend.grad_norm(run.engine),
        "tokens_per_second": totals[3] / elapsed,
    }


@torch.no_grad()
def evaluate(run: RewardRun) -> dict[str, float]:
    """Held-out pair accuracy: s(chosen > rejected) > 0, an exact tie counting 1/2; and the mean loss."""
    run.engine.eval()
    mine = list(range(rank(), len(run.eval_examples), world_size()))
    totals = [0.0, 0.0, 0.0]  # loss * pairs, accuracy, pairs
    for start in range(0, len(mine), run.cfg.train.micro_batch_size):
        pairs = [run.eval_examples[i] for i in mine[start : start + run.cfg.train.micro_batch_size]]
        batch = collate_pairs(pairs, run.cfg.data.packing, run.tokenizer.pad_token_id).to(run.engine.device)
        chosen, rejected, gate = head_outputs(run, batch)
        loss, _ = preference_loss(run.cfg.algo, chosen, rejected, gate)
        scores = pair_scores(chosen, rejected, gate, run.cfg.algo.head)
        totals[0] += float(loss) * len(pairs)
        totals[1] += float((scores > 0).sum() + 0.5 * (scores == 0).sum())
        totals[2] += len(pairs)
    run.engine.train()
    totals = all_reduce_sum(totals)
    return {"eval_loss": totals[0] / totals[2], "eval_accuracy": totals[1] / totals[2]}


def save(run: RewardRun, step: int) -> None:
    save_checkpoint(
        run.engine,
        run.run_dir,
        step,
        {"algo": "rm", "head": run.cfg.algo.head, "total_steps": run.total_steps},
        run.cfg.checkpoint.keep_last,
    )


def export(run: RewardRun) -> None:
    """final/: the reward-model directory (weights gathered under ZeRO-3, written by rank 0)."""
    model = run.engine.module
    with gathered_parameters(model, run.cfg.deepspeed.zero_stage):
        state = (
            {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
            if is_main_process()
            else None
        )
    if is_main_process():
        save_reward_model(model, run.tokenizer, run.run_dir / "final", state)
    barrier()


def train(run: RewardRun) -> None:
    cfg = run.cfg
    run.logger = MetricsLogger(run.run_dir, cfg.logger, {}, run.total_steps, run.start_step)
    try:
        if run.eval_examples and run.start_step == 0:
            run.logger.log(0, evaluate(run))
        for step in range(run.start_step, run.total_steps):
            metrics = train_step(run, step)
            done = step + 1
            if (
                run.eval_examples
                and cfg.train.eval_every
                and done % cfg.train.eval_every == 0
                and done != run.total_steps
            ):
                metrics.update(evaluate(run))
            if done % cfg.logger.log_every == 0 or done == run.total_steps:
                run.logger.log(done, metrics)
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
                save(run, done)
        if run.eval_examples:
            run.logger.log(run.total_steps, evaluate(run))
    finally:
        run.logger.close()


def main(cfg) -> Path:
    run = setup(cfg)
    train(run)
    save(run, run.total_steps)
    export(run)
    log.info("done: %s", run.run_dir / "final")
    return run.run_dir
