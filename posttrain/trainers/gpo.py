"""General Preference Optimization (algo=gpo) and SPPO (algo.loss=sppo): iterative self-play against a
trained preference model (REFERENCE.md section 3; Zhang et al. 2024, Wu et al. 2024).

Iteration t, from the policy pi_t:
  1. sample K = algo.sampling.n responses for each of `prompts_per_iteration` prompts (RolloutService);
  2. score all K x K pairs with the frozen preference model (each response embedded once);
  3. per-response targets from the score matrix (`self_play_targets(algo.loss)`: s_hat = mean score / tau
     for gpo, mean win probability for sppo); the best and the worst response of a prompt form its pair;
  4. log pi_t of those pairs, computed before any update of the iteration (the reference is the previous iterate);
  5. `epochs_per_iteration` passes of the loss over the pairs, then the new weights go into the engine.
Checkpoints fall on iteration boundaries (`checkpoint.every` counts iterations). The must-show metric,
`score_vs_initial`, is the mean preference score s(y > y0) of the current policy's samples y against samples
y0 of the initial policy on held-out prompts; the y0 are drawn once, before any update, and kept in
run_dir/initial_samples*.jsonl so a resumed run compares against the same ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from posttrain.data.batching import StepPlan
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.data.loading import load_rows
from posttrain.data.preference import PairBatch, PreferenceExample, collate_pairs, sequence_logprob_sums
from posttrain.data.prompts import PromptRow, build_prompt_rows
from posttrain.engine import backend
from posttrain.engine.checkpoint import load_checkpoint, save_checkpoint
from posttrain.engine.distributed import all_reduce_sum, init_distributed, rank, world_size
from posttrain.engine.export import export_hf, rollout_model_dir
from posttrain.errors import ConfigError
from posttrain.logging import MetricsLogger
from posttrain.losses import SELF_PLAY_LOSSES
from posttrain.losses.preference import self_play_targets
from posttrain.models.loading import load_model, load_tokenizer
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.lora import wrap_lora
from posttrain.models.reward import HEAD_FILE, load_reward_model, score_matrices
from posttrain.rollout.config import SamplingConfig
from posttrain.rollout.service import RolloutService, as_sampling_config, build_rollout_service
from posttrain.run_dir import resume_point, write_config
from posttrain.training import pair_logprob_sums, pair_loss_scale, seed_everything

log = logging.getLogger("posttrain")

LOSS_METRICS = ("loss", "logratio/winner", "logratio/loser", "target/winner", "target/loser")


@dataclass
class PreferenceScorer:
    """The frozen preference model with its own tokenizer; scores response texts."""

    model: torch.nn.Module
    tokenizer: object
    tau: float
    batch_size: int

    def matrices(self, prompts: list[list[dict]], responses: list[list[str]]) -> torch.Tensor:
        """[P, K, K] scores s(y_i > y_j | x_p) (see `posttrain.models.reward.score_matrices`)."""
        return score_matrices(self.model, self.tokenizer, prompts, responses, self.batch_size)


@dataclass
class SelfPlayPairs:
    """An iteration's (best, worst) pairs, one per prompt, with targets and the previous iterate's log-probs."""

    examples: list[PreferenceExample]  # chosen = the best response, rejected = the worst
    target_w: torch.Tensor  # [N] the loss's targets (s_hat or P_hat) of the best / worst response
    target_l: torch.Tensor
    engine_w: torch.Tensor  # [N] the rollout engine's summed log-probs of the same responses (as sampled)
    engine_l: torch.Tensor
    reference_w: torch.Tensor | None = None  # [N] log pi_t(y) summed over response tokens
    reference_l: torch.Tensor | None = None


@dataclass
class GPORun:
    cfg: object
    run_dir: Path
    tokenizer: object
    engine: object
    rollout: RolloutService
    scorer: PreferenceScorer
    train_prompts: list[PromptRow]
    eval_prompts: list[PromptRow]  # this rank's share
    prompt_plan: StepPlan
    steps_per_epoch: int
    start_iteration: int
    initial_samples: list[list[str]] | None = None  # per eval prompt of this rank: the initial policy's samples
    logger: MetricsLogger | None = None


def check_config(cfg) -> None:
    """Every GPO setting that can be wrong, checked before anything is read or written; one error lists all."""
    algo = cfg.algo
    self_play_targets(algo.loss)  # an unknown loss fails listing gpo, sppo
    problems = []
    if not algo.reward_model:
        problems.append(
            "algo.reward_model is not set: pass the final/ dir of an algo=rm run (head=gpm or bt), "
            "e.g. algo.reward_model=runs/rm/final"
        )
    elif not (Path(algo.reward_model) / HEAD_FILE).exists():
        problems.append(
            f"algo.reward_model={algo.reward_model} is not a posttrain reward-model directory (no {HEAD_FILE}); "
            "pass the final/ dir of an algo=rm run"
        )
    checks = {
        f"algo.sampling.n={algo.sampling.n} must be >= 2 (the K responses per prompt that make the pairs)": (
            algo.sampling.n < 2
        ),
        f"algo.beta={algo.beta} must be > 0": algo.beta <= 0,
        f"algo.tau={algo.tau} must be > 0 (or null: the reward model's own)": algo.tau is not None and algo.tau <= 0,
        f"algo.iterations={algo.iterations} must be >= 1": algo.iterations < 1,
        f"algo.epochs_per_iteration={algo.epochs_per_iteration} must be >= 1": algo.epochs_per_iteration < 1,
        f"algo.eval_samples_per_prompt={algo.eval_samples_per_prompt} must be >= 1": algo.eval_samples_per_prompt < 1,
    }
    problems += [problem for problem, failed in checks.items() if failed]
    local_prompts, remainder = divmod(algo.prompts_per_iteration, world_size())
    pairs_per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
    if remainder or local_prompts < pairs_per_step:
        problems.append(
            f"algo.prompts_per_iteration={algo.prompts_per_iteration} must be a multiple of the world size "
            f"{world_size()} giving each rank at least train.micro_batch_size x gradient_accumulation_steps = "
            f"{pairs_per_step} pairs"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def unique_prompts(rows, split: str) -> list[PromptRow]:
    """Prompt rows of `split` with repeated prompts dropped (preference data repeats a prompt per pair)."""
    seen, prompts = set(), []
    for prompt in build_prompt_rows(rows, need_verifier=False):
        key = json.dumps(prompt.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    log.debug("%s: %d distinct prompts", split, len(prompts))
    return prompts


def load_scorer(cfg) -> PreferenceScorer:
    model, tokenizer = load_reward_model(cfg.algo.reward_model, cfg.model.dtype)
    model.requires_grad_(False)
    tau = cfg.algo.tau if cfg.algo.tau is not None else model.head_config.tau
    return PreferenceScorer(model, tokenizer, tau, cfg.algo.scoring_batch_size)


def setup(cfg) -> GPORun:
    init_distributed()
    seed_everything(cfg.seed + rank())
    check_config(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoint = resume_point(run_dir, cfg.resume)
    train_prompts = unique_prompts(load_rows(cfg.data, "train"), "train")
    eval_rows = load_rows(cfg.data, "eval")
    eval_prompts = (unique_prompts(eval_rows, "eval") if eval_rows else train_prompts)[: cfg.algo.eval_prompts]
    saved_tokenizer = run_dir / "tokenizer"
    texts = [m["content"] for p in train_prompts for m in p.prompt]
    tokenizer = load_tokenizer(cfg.model, texts, saved_tokenizer if saved_tokenizer.exists() else None)
    scorer = load_scorer(cfg)

    write_config(run_dir, cfg)
    if not cfg.model.path and rank() == 0 and not saved_tokenizer.exists():
        tokenizer.save_pretrained(str(saved_tokenizer))
    model = load_model(cfg.model, tokenizer, cfg.seed)
    if cfg.peft.enabled:
        model = wrap_lora(model, cfg.peft)
    module = CausalLMWithLogprobs(model, fused=cfg.model.fused_logprobs, zero_stage=cfg.deepspeed.zero_stage)
    prompt_plan = StepPlan(
        cfg.algo.prompts_per_iteration // world_size(), 1, world_size(), len(train_prompts), cfg.seed
    )
    prompt_plan.step_indices(0)  # fewer train prompts than one iteration fails now, with the numbers
    pairs_per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
    steps_per_epoch = prompt_plan.micro_batch_size // pairs_per_step
    total_steps = cfg.algo.iterations * cfg.algo.epochs_per_iteration * steps_per_epoch
    engine = backend.build_engine(module, cfg, total_steps)
    scorer.model.to(engine.device)
    rollout = build_rollout_service(
        cfg.rollout, rollout_model_dir(cfg, run_dir, engine.module.policy, tokenizer), tokenizer
    )
    start_iteration = load_checkpoint(engine, checkpoint)["step"] if checkpoint else 0
    if checkpoint:
        log.info("resumed from %s (iteration %d)", checkpoint, start_iteration)
        rollout.sync_weights(engine)
    log.info(
        "GPO (%s, beta %g, tau %g): %d train / %d eval prompts, %d iterations of %d prompts x K=%d samples, "
        "%d optimizer steps each",
        cfg.algo.loss,
        cfg.algo.beta,
        scorer.tau,
        len(train_prompts),
        len(eval_prompts),
        cfg.algo.iterations,
        cfg.algo.prompts_per_iteration,
        cfg.algo.sampling.n,
        cfg.algo.epochs_per_iteration * steps_per_epoch,
    )
    return GPORun(
        cfg,
        run_dir,
        tokenizer,
        engine,
        rollout,
        scorer,
        train_prompts,
        eval_prompts[rank() :: world_size()],
        prompt_plan,
        steps_per_epoch,
        start_iteration,
    )


def sampling_config(algo, n: int, iteration: int) -> SamplingConfig:
    """`algo.sampling` with `n` samples; a set sampling.seed is offset per iteration (reproducible, never reused).
    (The vllm backend drops it on CPU, where vLLM cannot seed single requests; the hf backend honours it.)"""
    sampling = as_sampling_config(
        OmegaConf.to_container(algo.sampling) if OmegaConf.is_config(algo.sampling) else algo.sampling
    )
    seed = None if sampling.seed is None else sampling.seed + 1_000_003 * (iteration + 1)
    return dataclasses.replace(sampling, n=n, seed=seed)


def grouped_completions(rollout: RolloutService, prompts: list[list[dict]], sampling: SamplingConfig):
    """Completions per prompt: a list of P lists of `sampling.n` completions."""
    groups = [[] for _ in prompts]
    for completion in rollout.generate(prompts, sampling):
        groups[completion.prompt_index].append(completion)
    return groups


def completion_example(completion) -> TokenizedExample:
    """prompt + completion ids with labels on the completion tokens (its EOS included when it stopped)."""
    ids = list(completion.prompt_token_ids) + list(completion.token_ids)
    return TokenizedExample(ids, [IGNORE_INDEX] * len(completion.prompt_token_ids) + list(completion.token_ids))


def self_play_pairs(run: GPORun, prompts: list[PromptRow], groups) -> tuple[SelfPlayPairs, dict[str, float]]:
    """Score every prompt's K samples, keep (best, worst) by the loss's target; returns pairs and sample stats."""
    texts = [[completion.text for completion in group] for group in groups]
    scores = run.scorer.matrices([p.prompt for p in prompts], texts)  # [P, K, K]
    targets = self_play_targets(run.cfg.algo.loss)(scores, run.scorer.tau)  # [P, K]
    best, worst = targets.argmax(-1), targets.argmin(-1)
    rows = torch.arange(len(prompts))
    examples, engine_w, engine_l = [], [], []
    for group, b, w in zip(groups, best.tolist(), worst.tolist()):
        examples.append(
            PreferenceExample(
                completion_example(group[b]), completion_example(group[w]), len(group[b].prompt_token_ids)
            )
        )
        engine_w.append(sum(group[b].logprobs))
        engine_l.append(sum(group[w].logprobs))
    mean_scores = scores.mean(-1) / run.scorer.tau  # s_hat whatever the loss, for a comparable spread metric
    stats = {
        "s_hat_sum": float(mean_scores.sum()),
        "s_hat_sq": float((mean_scores**2).sum()),
        "samples": float(mean_scores.numel()),
        "response_tokens": float(sum(len(c.token_ids) for group in groups for c in group)),
        "truncated": float(sum(c.finish_reason != "stop" for group in groups for c in group)),
        "target_margin_sum": float((targets[rows, best] - targets[rows, worst]).sum()),
        "identical_pairs": float(sum(e.chosen.input_ids == e.rejected.input_ids for e in examples)),
    }
    pairs = SelfPlayPairs(
        examples,
        targets[rows, best].float(),
        targets[rows, worst].float(),
        torch.tensor(engine_w, dtype=torch.float32),
        torch.tensor(engine_l, dtype=torch.float32),
    )
    return pairs, stats


def tempered_logprob_sums(model, batch: PairBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_logprob_sums` under logits / temperature: the distribution the engine sampled from."""
    inputs = dict(batch.inputs)
    targets = inputs.pop("targets")
    token_logprobs, _ = model(targets=targets, temperature=temperature, **inputs)
    sums = sequence_logprob_sums(token_logprobs, targets, batch.segment_ids, 2 * batch.num_pairs)
    return sums[: batch.num_pairs], sums[batch.num_pairs :]


@torch.no_grad()
def previous_iterate_logprobs(run: GPORun, pairs: SelfPlayPairs, temperature: float = 1.0):
    """log pi_t of every pair's responses ([N] winner, [N] loser) before the iteration's updates."""
    run.engine.eval()
    winners, losers = [], []
    size = run.cfg.train.micro_batch_size
    for start in range(0, len(pairs.examples), size):
        batch = collate_pairs(pairs.examples[start : start + size], run.cfg.data.packing, run.tokenizer.pad_token_id)
        batch = batch.to(run.engine.device)
        winner, loser = (
            pair_logprob_sums(run.engine, batch)
            if temperature == 1.0
            else tempered_logprob_sums(run.engine, batch, temperature)
        )
        winners.append(winner.cpu())
        losers.append(loser.cpu())
    run.engine.train()
    return torch.cat(winners), torch.cat(losers)


def sync_gap(run: GPORun, pairs: SelfPlayPairs) -> float | None:
    """Largest |engine - trainer| summed log-prob over the pairs' responses, which pi_t sampled and the trainer
    scores as pi_t: ~0 when the engine holds the trainer's weights. None where the engine's log-probs are
    not the plain tempered distribution (top_p < 1, top_k > 0, greedy) or algo.check_sync is off."""
    sampling = run.cfg.algo.sampling
    if not run.cfg.algo.check_sync or sampling.top_p < 1.0 or sampling.top_k > 0 or sampling.temperature <= 0:
        return None
    if sampling.temperature == 1.0:
        trainer_w, trainer_l = pairs.reference_w, pairs.reference_l
    else:
        trainer_w, trainer_l = previous_iterate_logprobs(run, pairs, sampling.temperature)
    return float(torch.cat([(pairs.engine_w - trainer_w).abs(), (pairs.engine_l - trainer_l).abs()]).max())


def update_policy(run: GPORun, pairs: SelfPlayPairs, iteration: int) -> dict[str, float]:
    """`epochs_per_iteration` passes over the pairs; metrics are pair-weighted means over all micro-batches."""
    cfg, engine = run.cfg, run.engine
    plan = StepPlan(
        cfg.train.micro_batch_size,
        cfg.train.gradient_accumulation_steps,
        1,
        len(pairs.examples),
        cfg.seed * 7919 + iteration,
    )  # local pairs: DeepSpeed's mean over ranks makes the global mean
    loss_fn = SELF_PLAY_LOSSES.get(cfg.algo.loss)
    totals = [0.0] * (len(LOSS_METRICS) + 1)
    for step in range(cfg.algo.epochs_per_iteration * run.steps_per_epoch):
        for indices in plan.micro_batches(step, 0):
            batch = collate_pairs([pairs.examples[i] for i in indices], cfg.data.packing, run.tokenizer.pad_token_id)
            policy_w, policy_l = pair_logprob_sums(engine, batch.to(engine.device))
            device = policy_w.device
            picked = torch.tensor(indices)
            loss, metrics = loss_fn(
                policy_w,
                policy_l,
                pairs.reference_w[picked].to(device),
                pairs.reference_l[picked].to(device),
                pairs.target_w[picked].to(device),
                pairs.target_l[picked].to(device),
                beta=cfg.algo.beta,
            )
            engine.backward(loss * pair_loss_scale(len(indices), plan), scale_wrt_gas=False)
            backend.step(engine, cfg.optim.max_grad_norm)
            for position, name in enumerate(LOSS_METRICS):
                totals[position] += float(metrics[name]) * len(indices)
            totals[-1] += len(indices)
    totals = all_reduce_sum(totals)
    return {name: totals[position] / totals[-1] for position, name in enumerate(LOSS_METRICS)}


def initial_samples_path(run: GPORun) -> Path:
    return run.run_dir / ("initial_samples.jsonl" if world_size() == 1 else f"initial_samples.rank{rank()}.jsonl")


def load_or_draw_initial_samples(run: GPORun) -> None:
    """The initial policy's samples on this rank's eval prompts: from the run dir, or drawn now (before any update)."""
    path = initial_samples_path(run)
    if path.exists():
        run.initial_samples = [json.loads(line)["responses"] for line in path.read_text().splitlines() if line.strip()]
        return
    if run.start_iteration > 0:
        raise ConfigError(
            f"{path} is missing: a resumed GPO run compares against the initial policy's samples saved there"
        )
    run.initial_samples = []
    if run.eval_prompts:
        sampling = sampling_config(run.cfg.algo, run.cfg.algo.eval_samples_per_prompt, -1)
        groups = grouped_completions(run.rollout, [p.prompt for p in run.eval_prompts], sampling)
        run.initial_samples = [[completion.text for completion in group] for group in groups]
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "responses": r}) + "\n"
            for p, r in zip(run.eval_prompts, run.initial_samples)
        )
    )
    staging.replace(path)


def score_against_initial(run: GPORun, iteration: int) -> dict[str, float]:
    """Mean s(y > y0) / win rate sigma(s / tau) of fresh samples y of the current policy against the initial y0."""
    totals = [
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ]  # score sum, score^2 sum (per sample, mean over y0), win-rate sum, samples, tokens
    if run.eval_prompts:
        m = run.cfg.algo.eval_samples_per_prompt
        groups = grouped_completions(
            run.rollout, [p.prompt for p in run.eval_prompts], sampling_config(run.cfg.algo, m, 10_000 + iteration)
        )
        responses = [[c.text for c in group] + initial for group, initial in zip(groups, run.initial_samples)]
        scores = run.scorer.matrices([p.prompt for p in run.eval_prompts], responses)[
            :, :m, m:
        ]  # [P, current, initial]
        per_sample = scores.mean(-1)
        totals = [
            float(per_sample.sum()),
            float((per_sample**2).sum()),
            float(torch.sigmoid(scores / run.scorer.tau).mean(-1).sum()),
            float(per_sample.numel()),
            float(sum(len(c.token_ids) for group in groups for c in group)),
        ]
    score, score_sq, wins, samples, tokens = all_reduce_sum(totals)
    samples = max(samples, 1.0)
    mean = score / samples
    return {
        "score_vs_initial": mean,
        "score_vs_initial_std": max(score_sq / samples - mean**2, 0.0) ** 0.5,
        "win_rate_vs_initial": wins / samples,
        "eval_response_length": tokens / samples,
    }


def iteration_step(run: GPORun, iteration: int) -> dict[str, float]:
    """One self-play iteration (module docstring, steps 1-5) and the weight sync; returns its metrics."""
    algo = run.cfg.algo
    prompts = [run.train_prompts[i] for i in run.prompt_plan.micro_batches(iteration, rank())[0]]
    started = time.perf_counter()
    groups = grouped_completions(
        run.rollout, [p.prompt for p in prompts], sampling_config(algo, algo.sampling.n, iteration)
    )
    rollout_seconds = time.perf_counter() - started
    started = time.perf_counter()
    pairs, stats = self_play_pairs(run, prompts, groups)
    scoring_seconds = time.perf_counter() - started
    started = time.perf_counter()
    pairs.reference_w, pairs.reference_l = previous_iterate_logprobs(run, pairs)
    gap = sync_gap(run, pairs)
    metrics = update_policy(run, pairs, iteration)
    run.rollout.sync_weights(run.engine)
    train_seconds = time.perf_counter() - started
    names = list(stats)
    totals = dict(zip(names, all_reduce_sum([stats[name] for name in names])))
    samples = totals["samples"]
    mean = totals["s_hat_sum"] / samples
    metrics.update(
        {
            "s_hat_std": max(totals["s_hat_sq"] / samples - mean**2, 0.0) ** 0.5,
            "target_margin": totals["target_margin_sum"] / (samples / algo.sampling.n),
            "identical_pair_fraction": totals["identical_pairs"] / (samples / algo.sampling.n),
            "response_length": totals["response_tokens"] / samples,
            "truncated_fraction": totals["truncated"] / samples,
            "lr": backend.current_lr(run.engine),
            "grad_norm": backend.grad_norm(run.engine),
            "rollout_seconds": rollout_seconds,
            "scoring_seconds": scoring_seconds,
            "train_seconds": train_seconds,
        }
    )
    if gap is not None:
        metrics["sync/max_logprob_gap"] = max(all_reduce_max(gap), 0.0)
    return metrics


def all_reduce_max(value: float) -> float:
    """`value`'s max over ranks: each rank fills its own slot of a list that is then summed."""
    slots = [0.0] * world_size()
    slots[rank()] = value
    return max(all_reduce_sum(slots))


def save(run: GPORun, iteration: int) -> None:
    save_checkpoint(
        run.engine,
        run.run_dir,
        iteration,
        {"algo": "gpo", "loss": run.cfg.algo.loss, "iterations": run.cfg.algo.iterations},
        run.cfg.checkpoint.keep_last,
    )


def train(run: GPORun) -> None:
    """Iterations from `start_iteration`; metrics logged at step = iterations done (step 0: the initial policy)."""
    cfg = run.cfg
    run.logger = MetricsLogger(run.run_dir, cfg.logger, {}, cfg.algo.iterations, run.start_iteration)
    try:
        load_or_draw_initial_samples(run)
        if run.start_iteration == 0:
            run.logger.log(0, score_against_initial(run, 0))
        for iteration in range(run.start_iteration, cfg.algo.iterations):
            metrics = iteration_step(run, iteration)
            done = iteration + 1
            metrics.update(score_against_initial(run, done))
            run.logger.log(done, metrics)
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
                save(run, done)
    finally:
        run.logger.close()


def finish(run: GPORun) -> Path:
    """The last checkpoint and final/ (a Hugging Face directory of the policy)."""
    save(run, run.cfg.algo.iterations)
    export_hf(run.engine.module.policy, run.tokenizer, run.run_dir / "final", run.cfg.deepspeed.zero_stage)
    log.info("done: %s", run.run_dir / "final")
    return run.run_dir


def main(cfg) -> Path:
    run = setup(cfg)
    train(run)
    return finish(run)
