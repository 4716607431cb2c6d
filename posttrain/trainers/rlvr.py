"""RL with verifiable rewards: GRPO-family policy optimisation on the shared rollout service.

Per rollout step: sample G completions for each prompt through the RolloutService, score them with
the row's verifier, turn rewards into group advantages (dropping zero-variance groups), recompute the
old log-probs with the trainer (skipped when there is one optimizer step per batch: they are then the
step's own, detached), take `epochs_per_batch x minibatches_per_epoch` clipped policy-gradient
optimizer steps, then sync the new weights into the rollout engine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.batching import StepPlan, collate_packed
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.data.loading import load_rows
from posttrain.data.prompts import PromptRow, build_prompt_rows
from posttrain.engine import backend
from posttrain.engine.checkpoint import load_checkpoint, save_checkpoint
from posttrain.engine.distributed import all_reduce_sum, init_distributed, rank, world_size
from posttrain.engine.export import export_hf, hf_state_dict, rollout_model_dir
from posttrain.engine.reference import frozen_model
from posttrain.errors import ConfigError
from posttrain.logging import MetricsLogger
from posttrain.losses import POLICY_LOSSES
from posttrain.losses.policy import group_advantages
from posttrain.models.loading import load_model, load_tokenizer
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.lora import wrap_lora
from posttrain.rewards import VERIFIERS
from posttrain.rewards.reward import score_batch
from posttrain.rollout.config import SamplingConfig
from posttrain.rollout.service import RolloutService, build_rollout_service
from posttrain.run_dir import resume_point, write_config
from posttrain.training import batch_to, seed_everything, total_optimizer_steps

log = logging.getLogger("posttrain")


@dataclass
class Sequence:
    """One sampled completion as a training example."""

    example: TokenizedExample  # prompt + completion ids; labels on completion tokens only
    prompt_length: int
    advantage: float


@dataclass
class RLVRRun:
    cfg: object
    run_dir: Path
    tokenizer: object
    engine: object
    reference: object | None
    rollout: RolloutService
    train_prompts: list[PromptRow]
    eval_prompts: list[PromptRow]
    plan: StepPlan
    total_steps: int
    start_step: int
    logger: MetricsLogger | None = None


def check_config(cfg) -> None:
    algo = cfg.algo
    if algo.prompts_per_step % world_size():
        raise ConfigError(
            f"algo.prompts_per_step={algo.prompts_per_step} must be a multiple of the world size {world_size()}"
        )
    if algo.sampling.n < 2 and algo.drop_zero_variance_groups:
        raise ConfigError("algo.sampling.n must be >= 2 for group advantages (a group of one has no variance)")
    if algo.reference_refresh_every and cfg.peft.enabled:
        raise ConfigError(
            "algo.reference_refresh_every needs full fine-tuning: with peft=lora the reference is the base model"
        )


def build_reference(cfg, tokenizer, module: CausalLMWithLogprobs):
    """The frozen KL reference (None when algo.kl_beta == 0). With LoRA it is the policy with adapters off."""
    if cfg.algo.kl_beta == 0.0 or cfg.peft.enabled:
        return None
    model = load_model(cfg.model, tokenizer, cfg.seed)
    return frozen_model(
        CausalLMWithLogprobs(model, cfg.model.fused_logprobs, cfg.deepspeed.zero_stage),
        cfg.deepspeed.zero_stage,
        cfg.model.dtype,
    )


def setup(cfg) -> RLVRRun:
    init_distributed()
    seed_everything(cfg.seed + rank())
    check_config(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoint = resume_point(run_dir, cfg.resume)

    train_rows, eval_rows = load_rows(cfg.data, "train"), load_rows(cfg.data, "eval")
    train_prompts = build_prompt_rows(train_rows, need_verifier=True, known_verifiers=VERIFIERS.names())
    eval_prompts = (
        build_prompt_rows(eval_rows, need_verifier=True, known_verifiers=VERIFIERS.names()) if eval_rows else []
    )
    saved_tokenizer = run_dir / "tokenizer"
    texts = [m["content"] for p in train_prompts for m in p.prompt]
    tokenizer = load_tokenizer(cfg.model, texts, saved_tokenizer if saved_tokenizer.exists() else None)

    write_config(run_dir, cfg)
    if not cfg.model.path and rank() == 0 and not saved_tokenizer.exists():
        tokenizer.save_pretrained(str(saved_tokenizer))

    model = load_model(cfg.model, tokenizer, cfg.seed)
    if cfg.peft.enabled:
        model = wrap_lora(model, cfg.peft)
    module = CausalLMWithLogprobs(model, fused=cfg.model.fused_logprobs, zero_stage=cfg.deepspeed.zero_stage)
    reference = build_reference(cfg, tokenizer, module)

    plan = StepPlan(cfg.algo.prompts_per_step // world_size(), 1, world_size(), len(train_prompts), cfg.seed)
    total_steps = total_optimizer_steps(plan, cfg.train)
    optimizer_steps = total_steps * cfg.algo.epochs_per_batch * cfg.algo.minibatches_per_epoch
    engine = backend.build_engine(module, cfg, optimizer_steps)
    model_dir = rollout_model_dir(cfg, run_dir, engine.module.policy, tokenizer)
    rollout = build_rollout_service(cfg.rollout, model_dir, tokenizer)
    start_step = load_checkpoint(engine, checkpoint)["step"] if checkpoint else 0
    if checkpoint:
        log.info("resumed from %s (rollout step %d)", checkpoint, start_step)
    rollout.sync_weights(engine)  # the engine may hold older weights than the trainer (resume)
    log.info(
        "RLVR: %d train / %d eval prompts, %d rollout steps of %d prompts x %d samples",
        len(train_prompts),
        len(eval_prompts),
        total_steps,
        cfg.algo.prompts_per_step,
        cfg.algo.sampling.n,
    )
    return RLVRRun(
        cfg, run_dir, tokenizer, engine, reference, rollout, train_prompts, eval_prompts, plan, total_steps, start_step
    )


def response_logprobs(model, sequences: list[Sequence], with_entropy: bool = False, temperature: float = 1.0):
    """Per-token log-probs (and entropies) of each sequence's completion tokens, as [B, L] padded
    with zeros, from ONE packed forward of `model`, plus the [B, L] completion-token mask.

    `temperature` divides the logits, so the log-probs are those of the distribution the rollout
    sampled from (the ratio in the policy loss is then on-policy at any sampling temperature)."""
    batch = collate_packed([s.example for s in sequences])
    device = model.device if hasattr(model, "device") else next(model.parameters()).device
    batch = batch_to(batch, device)
    targets = batch.pop("targets")
    token_logprobs, token_entropy = model(targets=targets, temperature=temperature, **batch)
    lengths = [len(s.example.input_ids) - s.prompt_length for s in sequences]
    width = max(lengths)
    logprobs = token_logprobs.new_zeros(len(sequences), width)
    entropy = token_logprobs.new_zeros(len(sequences), width)
    mask = token_logprobs.new_zeros(len(sequences), width)
    offset = 0
    for row, (sequence, length) in enumerate(zip(sequences, lengths)):
        # Completion token k sits at position prompt_length + k and is predicted from the one before.
        start = offset + sequence.prompt_length - 1
        logprobs[row, :length] = token_logprobs[0, start : start + length]
        entropy[row, :length] = token_entropy[0, start : start + length]
        mask[row, :length] = 1.0
        offset += len(sequence.example.input_ids)
    return logprobs, (entropy if with_entropy else None), mask


def sample_and_score(run: RLVRRun, prompts: list[PromptRow]):
    """Completions for `prompts` (n each), their rewards [P, n] and rollout metrics."""
    algo = run.cfg.algo
    completions = run.rollout.generate([p.prompt for p in prompts], SamplingConfig(**algo.sampling))
    rows = [
        {"verifier": prompts[c.prompt_index].verifier, "ground_truth": prompts[c.prompt_index].ground_truth}
        for c in completions
    ]
    finished = [c.finish_reason == "stop" for c in completions]
    rewards, counts = score_batch(
        rows,
        [c.text for c in completions],
        finished,
        algo.verification_reward,
        algo.nonstop_penalty,
        algo.verifier_timeout_s,
    )
    metrics = {
        "verified": sum(r >= algo.verification_reward for r in rewards),
        "truncated": sum(not f for f in finished),
        "response_tokens": sum(len(c.token_ids) for c in completions),
        "verifier_errors": counts["error"],
        "verifier_timeouts": counts["timeout"],
    }
    return completions, torch.tensor(rewards).view(len(prompts), algo.sampling.n), metrics


def build_sequences(completions, advantages: torch.Tensor, keep: torch.Tensor, n: int) -> list[Sequence]:
    sequences = []
    for completion in completions:
        if not keep[completion.prompt_index] or not completion.token_ids:
            continue
        ids = list(completion.prompt_token_ids) + list(completion.token_ids)
        labels = [IGNORE_INDEX] * len(completion.prompt_token_ids) + list(completion.token_ids)
        advantage = float(advantages[completion.prompt_index, completion.sample_index])
        sequences.append(Sequence(TokenizedExample(ids, labels), len(completion.prompt_token_ids), advantage))
    return sequences


def chunks(items: list, parts: int) -> list[list]:
    """`items` split into exactly `parts` contiguous, near-equal chunks (some may be empty)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        out.append(items[start:end])
        start = end
    return out


def loss_scale(
    aggregation: str, chunk: list[Sequence], chunk_tokens: float, total_tokens: float, total_sequences: float
) -> float:
    """Weight of a chunk's aggregated loss so that summing chunks (and DeepSpeed's mean over ranks)
    gives the aggregation over the whole minibatch on all ranks."""
    if aggregation == "token_mean":
        return world_size() * chunk_tokens / total_tokens
    if aggregation == "sequence_mean":
        return world_size() * len(chunk) / total_sequences
    return float(world_size())  # sum_constant divides by a constant that covers the whole minibatch


def optimizer_step(run: RLVRRun, minibatch: list[Sequence], old: dict | None, reference: dict) -> dict[str, float]:
    """One optimizer step over `minibatch` (split into the configured accumulation chunks). `old` None: the
    chunk's own log-probs, detached, are the old ones (see `single_update`)."""
    cfg, algo, engine = run.cfg, run.cfg.algo, run.engine
    tokens = float(sum(len(s.example.input_ids) - s.prompt_length for s in minibatch))
    total_tokens, total_sequences = all_reduce_sum([tokens, float(len(minibatch))])
    constant = algo.sampling.max_tokens * total_sequences
    sums = {"clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0}
    for chunk in chunks(minibatch, cfg.train.gradient_accumulation_steps):
        if not chunk:  # keep every rank's backward count equal; contributes no gradient
            dummy = Sequence(
                TokenizedExample([run.tokenizer.eos_token_id] * 2, [IGNORE_INDEX, run.tokenizer.eos_token_id]), 1, 0.0
            )
            logprobs, _, _ = response_logprobs(engine, [dummy])
            engine.backward(logprobs.sum() * 0.0, scale_wrt_gas=False)
            backend.step(engine, cfg.optim.max_grad_norm)
            continue
        logprobs, entropy, mask = response_logprobs(
            engine, chunk, with_entropy=True, temperature=sampling_temperature(algo)
        )
        ids = [id(s) for s in chunk]
        loss, parts = POLICY_LOSSES.get("grpo")(
            logprobs,
            old_logprob_rows(old, chunk, logprobs, mask),
            torch.tensor([s.advantage for s in chunk], device=mask.device),
            mask,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            reference_logprobs=pad_rows([reference[i] for i in ids], mask) if reference else None,
            kl_beta=algo.kl_beta,
            kl_estimator=algo.kl_estimator,
            entropy=entropy,
            entropy_coef=algo.entropy_coef,
            aggregation=algo.aggregation,
            constant_normalizer=constant,
        )
        chunk_tokens = float(mask.sum())
        engine.backward(
            loss * loss_scale(algo.aggregation, chunk, chunk_tokens, total_tokens, total_sequences), scale_wrt_gas=False
        )
        backend.step(engine, cfg.optim.max_grad_norm)
        for key in ("clip_fraction", "kl", "entropy"):
            if key in parts:
                sums[key] += float(parts[key]) * chunk_tokens
        sums["tokens"] += chunk_tokens
    totals = dict(zip(sums, all_reduce_sum(list(sums.values()))))
    metrics = {key: totals[key] / max(totals["tokens"], 1.0) for key in ("clip_fraction", "entropy")}
    if reference:
        metrics["kl"] = totals["kl"] / max(totals["tokens"], 1.0)
    return metrics


def old_logprob_rows(
    old: dict | None, chunk: list[Sequence], logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The chunk's old log-probs [B, T]: recomputed ones from `old`, or (None, see `single_update`) the chunk's
    own log-probs detached."""
    return logprobs.detach() if old is None else pad_rows([old[id(s)] for s in chunk], mask)


def pad_rows(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for index, row in enumerate(rows):
        out[index, : row.numel()] = row
    return out


def sampling_temperature(algo) -> float:
    return algo.sampling.temperature if algo.sampling.temperature > 0 else 1.0


@torch.no_grad()
def per_sequence_logprobs(
    model, sequences: list[Sequence], micro_batch_size: int, temperature: float
) -> dict[int, torch.Tensor]:
    """{id(sequence): completion-token log-probs [L]} under `model` at `temperature` (no grad)."""
    out = {}
    for start in range(0, len(sequences), micro_batch_size):
        chunk = sequences[start : start + micro_batch_size]
        logprobs, _, mask = response_logprobs(model, chunk, temperature=temperature)
        for row, sequence in enumerate(chunk):
            out[id(sequence)] = logprobs[row, : int(mask[row].sum())]
    return out


def reference_logprobs(run: RLVRRun, sequences: list[Sequence]) -> dict[int, torch.Tensor]:
    if run.cfg.algo.kl_beta == 0.0:
        return {}
    size, temperature = run.cfg.train.micro_batch_size, sampling_temperature(run.cfg.algo)
    if run.reference is not None:
        return per_sequence_logprobs(run.reference, sequences, size, temperature)
    with run.engine.module.policy.disable_adapter():  # LoRA: the base model is the reference
        return per_sequence_logprobs(run.engine, sequences, size, temperature)


def single_update(algo) -> bool:
    """One optimizer step per rollout batch: every forward of that step runs on the very weights the old
    log-probs would be recomputed with, so the step's own log-probs, detached, are the old ones (ratio 1,
    the gradient of A log pi) and the extra no-grad forward that recomputes them is skipped (as TRL does)."""
    return algo.epochs_per_batch == 1 and algo.minibatches_per_epoch == 1


def update_policy(run: RLVRRun, sequences: list[Sequence], step: int) -> dict[str, float]:
    """Old log-probs (unless `single_update`), then the configured optimizer steps over the rollout batch."""
    algo, engine = run.cfg.algo, run.engine
    engine.eval()  # log-prob recomputation must match training forwards (no dropout either way)
    old = (
        None
        if single_update(algo)
        else per_sequence_logprobs(engine, sequences, run.cfg.train.micro_batch_size, sampling_temperature(algo))
    )
    reference = reference_logprobs(run, sequences)
    engine.train()
    metrics: dict[str, float] = {}
    generator = torch.Generator().manual_seed(run.cfg.seed * 7919 + step)
    for _ in range(algo.epochs_per_batch):
        order = [sequences[i] for i in torch.randperm(len(sequences), generator=generator).tolist()]
        for minibatch in chunks(order, algo.minibatches_per_epoch):
            metrics = optimizer_step(run, minibatch, old, reference)
    return metrics


def rollout_step(run: RLVRRun, step: int) -> dict[str, float]:
    algo = run.cfg.algo
    prompts = [run.train_prompts[i] for i in run.plan.micro_batches(step, rank())[0]]
    started = time.perf_counter()
    completions, rewards, counts = sample_and_score(run, prompts)
    rollout_seconds = time.perf_counter() - started
    advantages, keep = group_advantages(rewards, mode=algo.advantage)
    if not algo.drop_zero_variance_groups:
        keep = torch.ones_like(keep)
    sequences = build_sequences(completions, advantages, keep, algo.sampling.n)
    started = time.perf_counter()
    kept_sequences = all_reduce_sum([float(len(sequences))])[0]
    train_metrics = update_policy(run, sequences, step) if kept_sequences else {}
    if kept_sequences:
        run.rollout.sync_weights(run.engine)
    train_seconds = time.perf_counter() - started
    reward_sum, reward_sq, samples, kept_groups, *count_values = all_reduce_sum(
        [
            float(rewards.sum()),
            float((rewards**2).sum()),
            float(rewards.numel()),
            float(keep.sum()),
            *map(float, counts.values()),
        ]
    )
    totals = dict(zip(counts, count_values))
    mean = reward_sum / samples
    return {
        "reward_mean": mean,
        "reward_std": max(reward_sq / samples - mean**2, 0.0) ** 0.5,
        "accuracy": totals["verified"] / samples,
        "response_length": totals["response_tokens"] / samples,
        "truncated_fraction": totals["truncated"] / samples,
        "groups_kept_fraction": kept_groups / (samples / algo.sampling.n),
        "verifier_errors": totals["verifier_errors"],
        "verifier_timeouts": totals["verifier_timeouts"],
        "lr": backend.current_lr(run.engine),
        "grad_norm": backend.grad_norm(run.engine) if kept_sequences else 0.0,
        "rollout_seconds": rollout_seconds,
        "train_seconds": train_seconds,
        **train_metrics,
    }


def evaluate(run: RLVRRun) -> dict[str, float]:
    """Verified accuracy on the held-out prompts (each rank a strided share).

    `eval_greedy_accuracy` always; with `eval_temperature` > 0 also `eval_sampled_accuracy`, pass@1 averaged
    over `eval_samples_per_prompt` samples at that temperature. `eval_accuracy` is the configured one."""
    algo = run.cfg.algo
    result = {
        "eval_greedy_accuracy": verified_fraction(
            run, SamplingConfig(n=1, temperature=0.0, max_tokens=algo.eval_max_tokens)
        )
    }
    result["eval_accuracy"] = result["eval_greedy_accuracy"]
    if algo.eval_temperature > 0:
        sampling = SamplingConfig(
            n=algo.eval_samples_per_prompt, temperature=algo.eval_temperature, max_tokens=algo.eval_max_tokens
        )
        result["eval_sampled_accuracy"] = result["eval_accuracy"] = verified_fraction(run, sampling)
    return result


def verified_fraction(run: RLVRRun, sampling: SamplingConfig) -> float:
    """Fraction of completions (all ranks) of the held-out prompts under `sampling` that verify."""
    mine = run.eval_prompts[rank() :: world_size()]
    correct, samples = 0.0, 0.0
    if mine:
        completions = run.rollout.generate([p.prompt for p in mine], sampling)
        rows = [
            {"verifier": mine[c.prompt_index].verifier, "ground_truth": mine[c.prompt_index].ground_truth}
            for c in completions
        ]
        rewards, _ = score_batch(
            rows, [c.text for c in completions], [True] * len(completions), 1.0, 0.0, run.cfg.algo.verifier_timeout_s
        )
        correct, samples = float(sum(r >= 1.0 for r in rewards)), float(len(completions))
    total_correct, total = all_reduce_sum([correct, samples])
    return total_correct / max(total, 1.0)


def refresh_reference(run: RLVRRun) -> None:
    """Copy the current policy into the frozen reference (a "dynamic anchor")."""
    state = hf_state_dict(run.engine.module.policy, run.cfg.deepspeed.zero_stage, all_ranks=True)
    target = run.reference.module if hasattr(run.reference, "module") else run.reference
    from posttrain.engine.export import gathered_parameters

    with gathered_parameters(target.policy, run.cfg.deepspeed.zero_stage):
        target.policy.load_state_dict(state)


def save(run: RLVRRun, step: int) -> None:
    save_checkpoint(
        run.engine, run.run_dir, step, {"algo": "rlvr", "total_steps": run.total_steps}, run.cfg.checkpoint.keep_last
    )


def train(run: RLVRRun) -> None:
    cfg = run.cfg
    run.logger = MetricsLogger(run.run_dir, cfg.logger, {}, run.total_steps, run.start_step)
    try:
        if run.eval_prompts and run.start_step == 0:
            run.logger.log(0, evaluate(run))
        for step in range(run.start_step, run.total_steps):
            metrics = rollout_step(run, step)
            done = step + 1
            if (
                cfg.algo.reference_refresh_every
                and run.reference is not None
                and done % cfg.algo.reference_refresh_every == 0
            ):
                refresh_reference(run)
            if run.eval_prompts and cfg.algo.eval_every and done % cfg.algo.eval_every == 0 and done != run.total_steps:
                metrics.update(evaluate(run))
            run.logger.log(done, metrics)
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
                save(run, done)
        if run.eval_prompts:
            run.logger.log(run.total_steps, evaluate(run))
    finally:
        run.logger.close()


def main(cfg) -> Path:
    run = setup(cfg)
    train(run)
    save(run, run.total_steps)
    export_hf(run.engine.module.policy, run.tokenizer, run.run_dir / "final", cfg.deepspeed.zero_stage)
    log.info("done: %s", run.run_dir / "final")
    return run.run_dir
