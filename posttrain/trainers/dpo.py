"""Offline preference optimisation: the DPO family (dpo, dpo_norm, simpo, ipo, hinge, wpo).

setup -> (resume) -> train -> save -> export. Each micro-batch scores chosen and rejected responses in
one forward (`collate_pairs`); per-sequence log-prob sums and response lengths go to the loss named by
`algo.loss`. The reference log-probs are computed once before training and cached on disk
(`posttrain.engine.reference`), and the reference model is freed; `algo.reference.cache=false` keeps a
live reference instead, and reference-free losses (simpo) never build one.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from posttrain.data.batching import StepPlan
from posttrain.data.preference import PreferenceExample, collate_pairs, first_divergent_step, separator_tokens
from posttrain.engine import backend
from posttrain.engine.checkpoint import load_checkpoint, save_checkpoint
from posttrain.engine.distributed import all_reduce_sum, init_distributed, rank, world_size
from posttrain.engine.export import export_hf
from posttrain.engine.reference import (
    ReferenceLogprobs,
    cached_reference_logprobs,
    compute_reference_logprobs,
    default_cache_dir,
    frozen_model,
    model_fingerprint,
    reference_cache_key,
)
from posttrain.errors import ConfigError
from posttrain.logging import MetricsLogger
from posttrain.losses import PAIR_LOSSES
from posttrain.losses.dpo import chosen_nll
from posttrain.models.loading import load_model
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.lora import wrap_lora
from posttrain.run_dir import resume_point, write_config
from posttrain.training import (
    load_preference_data,
    pair_logprob_sums,
    pair_loss_scale,
    seed_everything,
    total_optimizer_steps,
)

log = logging.getLogger("posttrain")

REFERENCE_FREE_LOSSES = frozenset({"simpo"})
STEP_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
    "nll",
)


@dataclass
class Reference:
    """Where reference log-probs come from: cached per split, a live frozen model, or nowhere (simpo)."""

    train: ReferenceLogprobs | None = None
    eval: ReferenceLogprobs | None = None
    live: torch.nn.Module | None = None
    cache_hits: int = 0

    def sums(self, split: str, indices: list[int], batch, device):
        cached = self.train if split == "train" else self.eval
        if cached is not None:
            return cached.take(indices, device)
        if self.live is not None:
            with torch.no_grad():
                return pair_logprob_sums(self.live, batch)
        return None, None


@dataclass
class DPORun:
    cfg: object
    run_dir: Path
    tokenizer: object
    engine: object
    plan: StepPlan
    train_examples: list[PreferenceExample]
    eval_examples: list[PreferenceExample]
    reference: Reference
    total_steps: int
    start_step: int
    logger: MetricsLogger | None = None


def reference_model(cfg, tokenizer) -> CausalLMWithLogprobs:
    """The frozen reference: `algo.reference.path`, else the policy's starting point."""
    model_cfg = OmegaConf.merge(
        cfg.model, {"path": cfg.algo.reference.path or cfg.model.path, "gradient_checkpointing": False}
    )
    module = CausalLMWithLogprobs(
        load_model(model_cfg, tokenizer, cfg.seed), fused=cfg.model.fused_logprobs, zero_stage=cfg.deepspeed.zero_stage
    )
    return frozen_model(module, cfg.deepspeed.zero_stage, cfg.model.dtype, cfg.deepspeed.offload_params)


def build_reference(cfg, tokenizer, train_examples, eval_examples) -> Reference:
    """Reference log-probs per `algo.reference`: cached (the model is freed after), live, or none."""
    if cfg.algo.loss in REFERENCE_FREE_LOSSES:
        log.info("%s is reference-free: no reference model", cfg.algo.loss)
        return Reference()
    if not cfg.algo.reference.cache:
        return Reference(live=reference_model(cfg, tokenizer))
    ref_cfg = cfg.algo.reference
    model = model_fingerprint(ref_cfg.path or cfg.model.path, OmegaConf.to_container(cfg.model.tiny), cfg.seed)
    cache_dir = Path(ref_cfg.cache_dir) if ref_cfg.cache_dir else default_cache_dir()
    loaded: list[torch.nn.Module] = []

    def compute(examples):
        if not loaded:
            loaded.append(reference_model(cfg, tokenizer))
        device = next(iter(loaded[0].parameters())).device
        return compute_reference_logprobs(
            loaded[0], examples, ref_cfg.micro_batch_size, cfg.data.packing, tokenizer.pad_token_id, device
        )

    reference = Reference()
    for split, examples in (("train", train_examples), ("eval", eval_examples)):
        if not examples:
            continue
        key = reference_cache_key(
            model=model,
            examples=examples,
            tokenizer=tokenizer,
            max_length=cfg.data.max_length,
            truncation=cfg.data.truncation,
            dtype=cfg.model.dtype,
            fused=cfg.model.fused_logprobs,
        )
        logprobs, hit = cached_reference_logprobs(
            key, cache_dir, len(examples), lambda examples=examples: compute(examples)
        )
        setattr(reference, split, logprobs)
        reference.cache_hits += int(hit)
    loaded.clear()  # free the reference model before the policy is built
    gc.collect()
    return reference


def setup(cfg) -> DPORun:
    init_distributed()
    seed_everything(cfg.seed + rank())
    PAIR_LOSSES.get(cfg.algo.loss, "algo.loss")  # a wrong name fails now, naming the family
    if cfg.algo.nll_alpha < 0:
        raise ConfigError(
            f"algo.nll_alpha={cfg.algo.nll_alpha} is negative; it weighs the chosen NLL (RPO): use 0 to turn it "
            f"off or a positive weight"
        )
    run_dir = Path(cfg.run_dir)
    checkpoint = resume_point(run_dir, cfg.resume)
    tokenizer, train_examples, eval_examples = load_preference_data(cfg, run_dir)
    if cfg.algo.step_separator is not None:
        separators = separator_tokens(tokenizer, cfg.algo.step_separator)
        train_examples = [first_divergent_step(pair, separators) for pair in train_examples]
        eval_examples = [first_divergent_step(pair, separators) for pair in eval_examples]

    write_config(run_dir, cfg)
    if not cfg.model.path and rank() == 0 and not (run_dir / "tokenizer").exists():
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    reference = build_reference(cfg, tokenizer, train_examples, eval_examples)

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
        "DPO (%s, beta %g): %d train / %d eval pairs, %d steps, effective batch %d pairs (micro %d x accum %d x "
        "world %d)",
        cfg.algo.loss,
        cfg.algo.beta,
        len(train_examples),
        len(eval_examples),
        total_steps,
        plan.examples_per_step,
        plan.micro_batch_size,
        plan.gradient_accumulation_steps,
        plan.world_size,
    )
    return DPORun(
        cfg, run_dir, tokenizer, engine, plan, train_examples, eval_examples, reference, total_steps, start_step
    )


def pair_inputs(run: DPORun, split: str, indices: list[int]):
    """(batch, loss inputs) of pairs `indices` of `split`: ONE policy forward over chosen + rejected, the
    reference sums, the response lengths, in the family's argument order."""
    examples = run.train_examples if split == "train" else run.eval_examples
    batch = collate_pairs([examples[i] for i in indices], run.cfg.data.packing, run.tokenizer.pad_token_id).to(
        run.engine.device
    )
    policy_chosen, policy_rejected = pair_logprob_sums(run.engine, batch)
    reference_chosen, reference_rejected = run.reference.sums(split, indices, batch, run.engine.device)
    lengths = batch.response_lengths
    return batch, (
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        lengths[: batch.num_pairs],
        lengths[batch.num_pairs :],
    )


def family_loss(run: DPORun, inputs: tuple):
    """The loss `algo.loss` with its hyperparameters, plus `algo.nll_alpha` times the chosen NLL (RPO);
    returns (loss, metrics). `logps/chosen` and `logps/rejected` are the policy's per-token log-probs: when
    both fall, the policy is moving mass off both responses (to text neither of them is)."""
    algo = run.cfg.algo
    loss, metrics = PAIR_LOSSES.get(algo.loss)(
        *inputs, beta=algo.beta, label_smoothing=algo.label_smoothing, **dict(algo.loss_kwargs)
    )
    nll = chosen_nll(inputs[0], inputs[4])
    if algo.nll_alpha:
        loss = loss + algo.nll_alpha * nll
        metrics["loss"] = loss.detach()
    metrics.update(
        {
            "nll": nll.detach(),
            "logps/chosen": (inputs[0] / inputs[4]).detach().mean(),
            "logps/rejected": (inputs[1] / inputs[5]).detach().mean(),
        }
    )
    return loss, metrics


def train_step(run: DPORun, step: int) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; metrics are pair-weighted means over the step."""
    lr = backend.current_lr(run.engine)
    started = time.perf_counter()
    totals = [0.0] * (len(STEP_METRICS) + 2)  # metric sums weighted by pairs, pairs, tokens
    for indices in run.plan.micro_batches(step, rank()):
        batch, inputs = pair_inputs(run, "train", indices)
        loss, metrics = family_loss(run, inputs)
        run.engine.backward(loss * pair_loss_scale(len(indices), run.plan), scale_wrt_gas=False)
        backend.step(run.engine, run.cfg.optim.max_grad_norm)
        for position, name in enumerate(STEP_METRICS):
            totals[position] += float(metrics[name]) * len(indices)
        totals[-2] += len(indices)
        totals[-1] += float(
            batch.inputs["input_ids"].numel() if run.cfg.data.packing else batch.inputs["attention_mask"].sum()
        )
    elapsed = time.perf_counter() - started
    totals = all_reduce_sum(totals)
    result = {name: totals[position] / totals[-2] for position, name in enumerate(STEP_METRICS)}
    result.update(lr=lr, grad_norm=backend.grad_norm(run.engine), tokens_per_second=totals[-1] / elapsed)
    return result


@torch.no_grad()
def evaluate(run: DPORun) -> dict[str, float]:
    """Held-out pairs: mean loss; `eval_accuracy`, the fraction ranked right by the loss's implicit reward
    (chosen above rejected; an exact tie counts 1/2, so policy = reference at step 0 scores chance); and
    `eval_logp_accuracy`, the policy's own preference (mean response log-prob of chosen above rejected)."""
    run.engine.eval()
    mine = list(range(rank(), len(run.eval_examples), world_size()))
    totals = [0.0, 0.0, 0.0, 0.0]  # loss * pairs, accuracy, likelihood accuracy, pairs
    for start in range(0, len(mine), run.cfg.train.micro_batch_size):
        indices = mine[start : start + run.cfg.train.micro_batch_size]
        _, inputs = pair_inputs(run, "eval", indices)
        loss, _ = family_loss(run, inputs)
        for i in range(len(indices)):  # one pair at a time: the sign of its implicit-reward margin
            _, metrics = family_loss(run, tuple(None if t is None else t[i : i + 1] for t in inputs))
            margin = float(metrics["rewards/margin"])
            totals[1] += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
        chosen_mean, rejected_mean = inputs[0] / inputs[4], inputs[1] / inputs[5]
        totals[2] += float((chosen_mean > rejected_mean).sum())
        totals[0] += float(loss) * len(indices)
        totals[3] += len(indices)
    run.engine.train()
    totals = all_reduce_sum(totals)
    return {
        "eval_loss": totals[0] / totals[3],
        "eval_accuracy": totals[1] / totals[3],
        "eval_logp_accuracy": totals[2] / totals[3],
    }


def save(run: DPORun, step: int) -> None:
    save_checkpoint(
        run.engine,
        run.run_dir,
        step,
        {"algo": "dpo", "loss": run.cfg.algo.loss, "total_steps": run.total_steps},
        run.cfg.checkpoint.keep_last,
    )


def export(run: DPORun) -> None:
    export_hf(run.engine.module.policy, run.tokenizer, run.run_dir / "final", run.cfg.deepspeed.zero_stage)


def train(run: DPORun) -> None:
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
