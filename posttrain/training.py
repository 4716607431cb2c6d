"""The run loop every algorithm shares, and the set-up steps around it.

    run = start_run(cfg, algorithm)      # distributed init, seed, every config check, resume point: nothing written
    trainer = algorithm.entry(run)       # the algorithm's setup, which calls in this order:
        run.load_tokenizer(texts)        #   model.path's tokenizer, the run's saved one, or one trained on `texts`
        ...                              #   read and validate all data
        run.commit()                     #   the first write: config.yaml (resolved) and tokenizer/
        build_engine(run, module, n)     #   the DeepSpeed engine, with the resume checkpoint loaded
    run_loop(run, trainer)               # steps; logging, eval and checkpoint cadence; final checkpoint; export

Steps are optimizer steps everywhere. A trainer whose update takes several optimizer steps (RLVR's PPO epochs
and minibatches over one rollout batch, a GPO iteration) says so in `steps_per_update`; cadences then fire on the
update that crosses a multiple of their period.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from omegaconf import OmegaConf

from posttrain.data.batching import StepPlan, pack_token_budget
from posttrain.data.loading import load_rows
from posttrain.data.preference import PreferenceExample, build_preference_examples, pair_lengths, preference_texts
from posttrain.engine import backend
from posttrain.engine.checkpoint import load_checkpoint, remove_staging_dirs, save_checkpoint
from posttrain.engine.distributed import all_reduce_max, init_distributed, rank
from posttrain.errors import ConfigError
from posttrain.logging import MetricsLogger
from posttrain.models.loading import DTYPES, load_model, load_tokenizer
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.lora import wrap_lora
from posttrain.run_dir import lock_run_dir, resume_point, unlock_run_dir, write_config

log = logging.getLogger("posttrain")

T = TypeVar("T")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Trainer(Protocol):
    engine: Any  # the DeepSpeed engine whose state the checkpoints hold
    total_steps: int  # optimizer steps of the whole run (a multiple of steps_per_update)
    steps_per_update: int  # optimizer steps one train_step takes

    def train_step(self, step: int) -> dict[str, float]: ...

    def evaluate(self) -> dict[str, float]: ...

    def export(self, out_dir: Path) -> None: ...

    # Optional: `save_extra(directory)` adds the trainer's own files to each checkpoint (on every rank, collective);
    # the trainer restores them itself on resume (run.checkpoint). RLVR keeps a refreshed reference there.
    # Optional: `rollout`, the trainer's RolloutService (or None), closed when the run ends (`close_rollout`).


@dataclass
class Run:
    """One run: its config, directory and resume point, and what set-up fills in."""

    cfg: Any
    algorithm: Any  # posttrain.trainers.Algorithm
    run_dir: Path
    checkpoint: Path | None  # the checkpoint to resume from; None starts fresh
    tokenizer: Any = None
    start_step: int = 0  # optimizer steps already done (from the checkpoint)
    committed: bool = False

    def load_tokenizer(self, texts: Iterable[str] | None):
        """The run's tokenizer: `model.path`'s, the one saved in run_dir/tokenizer, or trained on `texts`."""
        saved = self.run_dir / "tokenizer"
        self.tokenizer = load_tokenizer(self.cfg.model, texts, saved if saved.exists() else None)
        return self.tokenizer

    def commit(self) -> None:
        """The run's first write, once every input is validated: config.yaml and (tiny model) tokenizer/."""
        write_config(self.run_dir, self.cfg)
        saved = self.run_dir / "tokenizer"
        if not self.cfg.model.path and rank() == 0 and not saved.exists():
            self.tokenizer.save_pretrained(str(saved))
        self.committed = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shared_config_problems(cfg) -> list[str]:
    """Every problem with the settings all algorithms share, found before anything is read or written."""
    train, optim, data = cfg.train, cfg.optim, cfg.data
    checks = {
        f"optim.lr={optim.lr} must be >= 0": optim.lr < 0,
        f"optim.warmup_ratio={optim.warmup_ratio} must be in [0, 1]": not 0 <= optim.warmup_ratio <= 1,
        f"optim.max_grad_norm={optim.max_grad_norm} must be >= 0 (0: no clipping)": optim.max_grad_norm < 0,
        f"train.micro_batch_size={train.micro_batch_size} must be >= 1": train.micro_batch_size < 1,
        f"train.gradient_accumulation_steps={train.gradient_accumulation_steps} must be >= 1": (
            train.gradient_accumulation_steps < 1
        ),
        f"train.epochs={train.epochs} must be >= 0": train.epochs < 0,
        f"train.max_steps={train.max_steps} must be -1 (run the epochs) or >= 1": (
            train.max_steps == 0 or train.max_steps < -1
        ),
        f"train.eval_every={train.eval_every} must be >= 0 (0: evaluate only at the start and the end)": (
            train.eval_every < 0
        ),
        f"checkpoint.every={cfg.checkpoint.every} must be >= 0": cfg.checkpoint.every < 0,
        f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1": cfg.checkpoint.keep_last < 1,
        f"logger.log_every={cfg.logger.log_every} must be >= 1": cfg.logger.log_every < 1,
        f"data.truncation={data.truncation!r} must be one of error, truncate, skip": (
            data.truncation not in ("error", "truncate", "skip")
        ),
        f"data.on_bad_row={data.on_bad_row!r} must be one of error, skip": data.on_bad_row not in ("error", "skip"),
        f"data.max_length={data.max_length} must be >= 2": data.max_length < 2,
        f"train.max_tokens_per_micro_batch={train.max_tokens_per_micro_batch} is below data.max_length="
        f"{data.max_length}: an example would not fit one micro-batch; raise it, lower data.max_length, or set null "
        "(fixed-size micro-batches)": (
            train.max_tokens_per_micro_batch is not None and train.max_tokens_per_micro_batch < data.max_length
        ),
        f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} must be 0, 1, 2 or 3": cfg.deepspeed.zero_stage
        not in range(4),
        f"model.dtype={cfg.model.dtype!r} must be one of {', '.join(DTYPES)}": cfg.model.dtype not in DTYPES,
    }
    problems = [problem for problem, failed in checks.items() if failed]
    path = cfg.model.path
    if path and not Path(path).exists() and not HUB_NAME.match(str(path)):
        problems.append(f"model.path={path} is neither an existing directory nor a hub name (owner/name)")
    return problems


def start_run(cfg, algorithm) -> Run:
    """Distributed init, seeding, every config check (one ConfigError listing all problems), the run-dir lock, the
    resume point (the newest valid checkpoint). Nothing but the lock file is written to the run dir."""
    init_distributed()
    seed_everything(cfg.seed + rank())
    problems = shared_config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    if algorithm.check is not None:
        algorithm.check(cfg)
    run_dir = Path(cfg.run_dir)
    lock_run_dir(run_dir)  # the one write before set-up: this process's claim on run_dir (ConfigError if taken)
    remove_staging_dirs(run_dir)
    return Run(cfg, algorithm, run_dir, resume_point(run_dir, cfg.resume))


def policy_module(run: Run, model_cfg=None) -> CausalLMWithLogprobs:
    """The policy (model.*, or `model_cfg`) with LoRA adapters when peft is on, wrapped to return log-probs."""
    cfg = run.cfg
    model = load_model(model_cfg or cfg.model, run.tokenizer, cfg.seed, backend.zero3_load_config(cfg))
    if cfg.peft.enabled:
        model = wrap_lora(model, cfg.peft)
    return CausalLMWithLogprobs(model, fused=cfg.model.fused_logprobs, zero_stage=cfg.deepspeed.zero_stage)


def build_engine(run: Run, module: torch.nn.Module, total_steps: int):
    """The DeepSpeed engine training `module` over `total_steps` optimizer steps; on resume, the checkpoint's
    model, optimizer, scheduler and RNG state are loaded and `run.start_step` set."""
    if not run.committed:
        raise RuntimeError("build_engine before run.commit(): validate the inputs and commit the run first")
    engine = backend.build_engine(module, run.cfg, total_steps)
    if run.checkpoint is not None:
        state = load_checkpoint(engine, run.checkpoint)
        if state.get("algo", run.algorithm.name) != run.algorithm.name:
            raise ConfigError(
                f"{run.checkpoint} is a checkpoint of algo={state['algo']}, not algo={run.algorithm.name}; "
                "choose another run_dir"
            )
        run.start_step = int(state["step"])
        log.info("resumed from %s (step %d of %d)", run.checkpoint, run.start_step, total_steps)
    return engine


def total_optimizer_steps(plan: StepPlan, train_cfg, steps_per_update: int = 1) -> int:
    """Optimizer steps of the run: `train.epochs` over the data (`plan.steps_per_epoch` updates an epoch, each of
    `steps_per_update` optimizer steps), capped (or set, with epochs 0) by `train.max_steps`, rounded down to
    whole updates."""
    total = plan.steps_per_epoch * train_cfg.epochs * steps_per_update
    if train_cfg.max_steps > 0:
        total = min(total, train_cfg.max_steps) if train_cfg.epochs > 0 else train_cfg.max_steps
    whole = total - total % steps_per_update
    if whole == 0:
        raise ConfigError(
            f"train.max_steps={train_cfg.max_steps} is fewer than one update ({steps_per_update} optimizer steps)"
        )
    if whole != total:
        log.warning("train.max_steps rounded down to %d: an update takes %d optimizer steps", whole, steps_per_update)
    return whole


def batch_to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def idle_micro_step(engine, stand_in_loss: Callable[[], torch.Tensor], max_grad_norm: float) -> None:
    """A micro-step whose loss counts 0, for a rank with nothing to train on in this micro-batch: it still joins the
    others' collectives (ZeRO-3 gathers parameters in every forward and backward, a live teacher's too) and
    DeepSpeed's count of micro-steps to the optimizer step. `stand_in_loss()` must run the trainer's OWN loss on a
    stand-in input (`idle_example`): ZeRO-3 hooks the backward of each model output the loss reaches and records
    the order modules run in, and a rank whose forward or backward takes another path than the others' (another
    model, another output) records another trace; DeepSpeed then waits in a collective the others never join."""
    engine.backward(stand_in_loss() * 0.0, scale_wrt_gas=False)
    backend.step(engine, max_grad_norm)


def step_micro_batches(
    fixed: list[list[T]], sizes: Callable[[T], Sequence[int]], max_tokens: int | None, padded: bool
) -> list[list[T]]:
    """This rank's micro-batches of one optimizer step: `fixed` (train.micro_batch_size or
    train.gradient_accumulation_steps ones) when `max_tokens` (train.max_tokens_per_micro_batch) is None; else
    all of `fixed`'s items re-packed into micro-batches of at most `max_tokens` tokens (`pack_token_budget`;
    `sizes(item)`: the sequence lengths the item puts in a forward; `padded`: forwards pad to the longest).
    The count may then differ between ranks and steps: run them through `micro_steps`."""
    if max_tokens is None:
        return fixed
    items = [item for micro_batch in fixed for item in micro_batch]
    return pack_token_budget(items, [sizes(item) for item in items], max_tokens, padded)


def pair_micro_batches(fixed: list[list[int]], examples: Sequence[PreferenceExample], cfg) -> list[list[int]]:
    """`step_micro_batches` of pair indices into `examples` under cfg.train.max_tokens_per_micro_batch: a pair
    puts its chosen and rejected sequences in one forward (cfg.data.packing: packed, else padded)."""
    return step_micro_batches(
        fixed, lambda i: pair_lengths(examples[i]), cfg.train.max_tokens_per_micro_batch, not cfg.data.packing
    )


def micro_steps(engine, micro_batches: list[list[T]]) -> Iterator[tuple[list[T] | None, float]]:
    """(micro-batch, weight) for each micro-step of one optimizer step: this rank's micro-batches (weight 1), then
    idle ones up to the count all ranks agree on, the most any rank has (a collective): under ZeRO-3 every
    forward and backward gathers parameters on every rank (a live reference's or teacher's too), so all run as
    many. An idle micro-step (and an empty micro-batch) is this rank's first item alone with weight 0: the
    trainer runs it as any other, its loss times 0, and leaves it out of the metrics; with no item at all it is
    (None, 0): run `idle_micro_step`. DeepSpeed's gradient-accumulation boundary is set before each micro-step,
    true on the last only: the count varies with train.max_tokens_per_micro_batch, so the engine's own count to
    gradient_accumulation_steps cannot say it."""
    count = int(all_reduce_max([float(len(micro_batches))])[0])
    first = next((batch[:1] for batch in micro_batches if batch), None)
    for index in range(count):
        engine.set_gradient_accumulation_boundary(index == count - 1)
        batch = micro_batches[index] if index < len(micro_batches) else []
        yield (batch, 1.0) if batch else (first, 0.0)


def pair_loss_scale(pairs_in_micro_batch: int, plan: StepPlan) -> float:
    """Factor turning a micro-batch's mean-over-pairs loss into its share of the step's mean.

    Summing micro-batch gradients (engine.backward with scale_wrt_gas=False) and DeepSpeed's mean over
    ranks then gives the gradient of the mean over all pairs of the step, whatever the split:
    scale = pairs_in_micro_batch * world_size / pairs_per_step.
    """
    return pairs_in_micro_batch * plan.world_size / plan.examples_per_step


def load_preference_data(run: Run) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train pairs, eval pairs) per `data.*`, all validated; loads the run's tokenizer on the pairs' text."""
    cfg = run.cfg
    train_rows, eval_rows = load_rows(cfg.data, "train"), load_rows(cfg.data, "eval")
    tokenizer = run.load_tokenizer(preference_texts(train_rows))
    train_examples, _ = build_preference_examples(train_rows, tokenizer, cfg.data, "train")
    eval_examples = build_preference_examples(eval_rows, tokenizer, cfg.data, "eval")[0] if eval_rows else []
    return train_examples, eval_examples


def crossed(done: int, steps: int, period: int) -> bool:
    """Did the update that took the run from `done - steps` to `done` optimizer steps cross a multiple of `period`?"""
    return period > 0 and done // period > (done - steps) // period


def save(run: Run, trainer: Trainer, step: int) -> None:
    state = {"algo": run.algorithm.name, "total_steps": trainer.total_steps}
    extra = getattr(trainer, "save_extra", None)
    save_checkpoint(trainer.engine, run.run_dir, step, state, run.cfg.checkpoint.keep_last, write_extra=extra)


def run_loop(run: Run, trainer: Trainer) -> None:
    """Train from `run.start_step` to `trainer.total_steps`: evaluate at the start (train.eval_at_start), every
    `train.eval_every` steps and after the last step; log every `logger.log_every` steps and the last (evals
    merged into the step's record); checkpoint every `checkpoint.every` steps and at the end; export final/.
    A rerun of a finished run only exports again."""
    cfg, total, per_update = run.cfg, trainer.total_steps, trainer.steps_per_update
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = MetricsLogger(run.run_dir, cfg.logger, resolved, total, run.start_step)
    try:
        if run.start_step == 0 and cfg.train.eval_at_start:
            logger.log_if_any(0, trainer.evaluate())
        for step in range(run.start_step, total, per_update):
            metrics = trainer.train_step(step)
            done = step + per_update
            if done == total or crossed(done, per_update, cfg.train.eval_every):
                metrics.update(trainer.evaluate())
            if done == total or crossed(done, per_update, cfg.logger.log_every):
                logger.log(done, metrics)
            if done == total or crossed(done, per_update, cfg.checkpoint.every):
                save(run, trainer, done)
    finally:
        logger.close()
    trainer.export(run.run_dir / "final")
    log.info("done: %s", run.run_dir / "final")


def close_rollout(trainer: Trainer) -> None:
    """Shut down the trainer's rollout engine, if it has one, when its run ends, also after an error. Left to the
    garbage collector, it would shut down whenever the collector gets to it, and its shut-down ends vLLM's
    per-process groups under whatever engine the process uses then (the next run's, in a Python caller's loop)."""
    rollout = getattr(trainer, "rollout", None)
    if rollout is not None:
        rollout.close()


def run_algorithm(cfg) -> Path:
    """Run `algo=<name>`: an orchestrator's own main, or a trainer's set-up and the run loop. Returns the run dir."""
    from posttrain.trainers import get_algorithm

    algorithm = get_algorithm(cfg.algo.name)
    if not algorithm.is_trainer:
        return algorithm.entry(cfg)
    try:
        run = start_run(cfg, algorithm)
        trainer = algorithm.entry(run)
        try:
            run_loop(run, trainer)
        finally:
            close_rollout(trainer)
    finally:
        unlock_run_dir(Path(cfg.run_dir))
    return run.run_dir
