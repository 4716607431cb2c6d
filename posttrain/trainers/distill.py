"""Distillation from a frozen teacher, offline, on-policy or mixed (Agarwal et al. 2024, GKD; Tiapkin et al. 2025).

One optimizer step over micro_batch_size x gradient_accumulation_steps x world prompts: a share
`algo.on_policy_fraction` of this rank's prompts get responses sampled from the student (RolloutService; weights
synced before each sampling), the rest keep the dataset's response (offline). The loss is the step's token mean of
the per-token `algo.divergence` (DIVERGENCES) between student and teacher: full-vocabulary ones from both models'
logits, `sampled_reverse_kl` from the two log-probs of the sampled tokens only (posttrain.models.distillation).
Eval: per-token forward KL, reverse KL and JSD(0.5) of the student to the teacher (the proxy; `teacher_distance`
is the training divergence's full-vocabulary form) and to `algo.oracle` (`oracle_distance`), on the student's own
seeded samples (`eval.*`) of held-out prompts and/or the held-out split's responses (`algo.eval_responses`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from posttrain.config import sampled_eval_request
from posttrain.data.batching import StepPlan, split_evenly
from posttrain.data.chat import TokenizedExample
from posttrain.data.loading import load_rows
from posttrain.data.prompts import build_prompt_rows
from posttrain.data.sft import build_sft_examples
from posttrain.engine import backend
from posttrain.engine.distributed import all_reduce_sum, rank, world_size
from posttrain.engine.export import export_hf
from posttrain.errors import ConfigError
from posttrain.losses import DIVERGENCES
from posttrain.losses.distill import full_vocab_divergence
from posttrain.models.distillation import (
    check_vocabularies,
    held_out_distances,
    padding_example,
    student_vocab_divergence,
    target_logprobs,
    teacher_logits,
)
from posttrain.models.loading import load_tokenizer
from posttrain.models.logprobs import idle_example
from posttrain.models.reference import frozen_model_at
from posttrain.rollout.config import SamplingConfig
from posttrain.rollout.samples import completion_example, rollout_model_dir
from posttrain.rollout.service import build_rollout_service
from posttrain.trainers import register_algo
from posttrain.training import (
    HUB_NAME,
    Run,
    build_engine,
    idle_micro_step,
    micro_steps,
    policy_module,
    step_micro_batches,
    total_optimizer_steps,
)

log = logging.getLogger("posttrain")
EVAL_RESPONSES = ("student", "dataset")


@dataclass
class DistillAlgoConfig:
    name: str = "distill"
    teacher: str | None = None  # required: the teacher's model dir or hub name (same tokenizer as the student)
    oracle: str | None = None  # optional ground-truth model for `oracle_distance` (teacher-hacking studies)
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd | sampled_reverse_kl (posttrain/losses/distill.py)
    beta: float = 0.5  # jsd's mixture weight (0 < beta < 1)
    on_policy_fraction: float = 1.0  # share of each step's prompts answered by the student; 0 = dataset responses
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=1, temperature=1.0, max_tokens=64))
    chunk_size: int = 1024  # positions per [chunk, V] logits tile
    eval_prompts: int = 64  # held-out prompts (data eval split) for the distances
    eval_responses: list[str] = field(default_factory=lambda: ["student"])  # student | dataset (metrics dataset_*)


def check_config(cfg) -> None:
    algo, problems = cfg.algo, []
    DIVERGENCES.get(algo.divergence, "algo.divergence")
    for key in ("teacher", "oracle"):
        path = algo[key]
        if (key == "teacher" or path) and not (path and (Path(path).exists() or HUB_NAME.match(str(path)))):
            problems.append(f"algo.{key}={path} must be a model directory or hub name (e.g. a runs/<sft>/final dir)")
    checks = {
        f"algo.on_policy_fraction={algo.on_policy_fraction} must be in [0, 1]": not 0 <= algo.on_policy_fraction <= 1,
        f"algo.beta={algo.beta} must be in (0, 1)": not 0 < algo.beta < 1,
        f"algo.sampling.temperature={algo.sampling.temperature} must be > 0": algo.sampling.temperature <= 0,
        f"algo.sampling.n={algo.sampling.n} must be >= 1": algo.sampling.n < 1,
        f"algo.chunk_size={algo.chunk_size} must be >= 1": algo.chunk_size < 1,
        f"algo.eval_responses={list(algo.eval_responses)} must name only {', '.join(EVAL_RESPONSES)}": (
            not set(algo.eval_responses) <= set(EVAL_RESPONSES)
        ),
    }
    problems += [problem for problem, failed in checks.items() if failed]
    if problems:
        raise ConfigError("; ".join(problems))
    if algo.divergence == "sampled_reverse_kl" and (algo.on_policy_fraction < 1 or algo.sampling.temperature != 1):
        log.warning("sampled_reverse_kl estimates KL(student || teacher) only on student samples at temperature 1")


@register_algo("distill", schema=DistillAlgoConfig, curve=("teacher_distance", "loss"), check=check_config)
class Distill:
    def __init__(self, run: Run):
        cfg, algo = run.cfg, run.cfg.algo
        self.cfg, train_rows, eval_rows = cfg, load_rows(cfg.data, "train"), load_rows(cfg.data, "eval")
        self.train_prompts = [p.prompt for p in build_prompt_rows(train_rows, need_verifier=False)]
        self.eval_prompts = (
            [p.prompt for p in build_prompt_rows(eval_rows, False)][: algo.eval_prompts] if eval_rows else []
        )
        if cfg.model.path:  # else the tiny student is built on the teacher's tokenizer
            self.tokenizer = run.load_tokenizer(None)
        else:
            teacher_cfg = OmegaConf.merge(cfg.model, {"path": algo.teacher})
            self.tokenizer = run.tokenizer = load_tokenizer(teacher_cfg, None, None)
        self.offline = self.tokenized(train_rows, "train") if algo.on_policy_fraction < 1 else []
        dataset_eval = "dataset" in algo.eval_responses and eval_rows
        self.eval_offline = self.tokenized(eval_rows, "eval")[: algo.eval_prompts] if dataset_eval else []
        run.commit()
        self.teacher = frozen_model_at(cfg, algo.teacher, self.tokenizer)
        self.oracle = frozen_model_at(cfg, algo.oracle, self.tokenizer) if algo.oracle else None
        module = policy_module(run)
        check_vocabularies(module, {"algo.teacher": self.teacher, "algo.oracle": self.oracle})
        train, self.steps_per_update = cfg.train, 1
        self.plan = StepPlan(train.micro_batch_size, train.gradient_accumulation_steps, world_size(),
                             len(self.train_prompts), cfg.seed)  # fmt: skip
        self.total_steps = total_optimizer_steps(self.plan, train)
        self.engine = build_engine(run, module, self.total_steps)
        self.rollout = None
        if algo.on_policy_fraction > 0 or "student" in algo.eval_responses:
            model_dir = rollout_model_dir(cfg, run.run_dir, self.engine.module.policy, self.tokenizer)
            self.rollout = build_rollout_service(cfg.rollout, model_dir, self.tokenizer)
        self.stale = True  # the rollout engine's weights lag the trainer's (always true after resume)
        log.info("distill (%s, on-policy share %g): %d train prompts, %d steps", algo.divergence,
                 algo.on_policy_fraction, len(self.train_prompts), self.total_steps)  # fmt: skip

    def tokenized(self, rows, split: str):
        examples, skipped = build_sft_examples(rows, self.tokenizer, self.cfg.data, split)
        if skipped.total() or len(examples) != len(rows):
            raise ConfigError(f"{skipped.total()} {split} rows were skipped: offline distillation pairs each prompt "
                              "with its row's response; fix the rows or use algo.on_policy_fraction=1")  # fmt: skip
        return examples

    def sample(self, prompts: list, sampling: SamplingConfig) -> list[TokenizedExample]:
        """The student's completions of `prompts` as examples; every rank calls it (the ZeRO-3 sync gathers)."""
        if self.stale:
            self.rollout.sync_weights(self.engine)
            self.stale = False
        completions = self.rollout.generate(prompts, sampling)  # also with no prompts: rollout groups need it
        return [completion_example(c) for c in completions if c.token_ids]

    def train_step(self, step: int) -> dict[str, float]:
        cfg, algo, engine = self.cfg, self.cfg.algo, self.engine
        indices = [i for micro in self.plan.micro_batches(step, rank()) for i in micro]
        on_policy = round(algo.on_policy_fraction * len(indices))  # the same on every rank
        sampling = SamplingConfig(**algo.sampling)
        if sampling.seed is not None:
            sampling.seed += 1_000_003 * (step + 1)
        examples = self.sample([self.train_prompts[i] for i in indices[:on_policy]], sampling) if on_policy else []
        sampled_tokens = float(sum(e.num_target_tokens for e in examples))
        examples += [self.offline[i] for i in indices[on_policy:]]
        local_tokens = float(sum(e.num_target_tokens for e in examples))
        step_tokens, sampled_all, sequences = all_reduce_sum([local_tokens, sampled_tokens, float(len(examples))])
        divergence_sum = 0.0
        micro_batches = step_micro_batches(
            split_evenly(examples, cfg.train.gradient_accumulation_steps), lambda e: (len(e.input_ids),),
            cfg.train.max_tokens_per_micro_batch, padded=False,  # student and teacher forwards are packed
        )  # fmt: skip
        for chunk, weight in micro_steps(engine, micro_batches):  # token mean over the step; weight 0: idle
            if chunk is None:  # no example on this rank at all: every rank runs the same micro-steps
                idle_micro_step(engine, self.stand_in_loss, cfg.optim.max_grad_norm)
                continue
            per_token = self.divergence(chunk)
            engine.backward(per_token.sum() * (world_size() / step_tokens) * weight, scale_wrt_gas=False)
            backend.step(engine, cfg.optim.max_grad_norm)
            divergence_sum += float(per_token.detach().sum()) * weight
        self.stale = True
        return {
            "loss": all_reduce_sum([divergence_sum])[0] / step_tokens,
            "on_policy_token_fraction": sampled_all / step_tokens, "response_length": step_tokens / sequences,
            "lr": backend.current_lr(engine), "grad_norm": backend.grad_norm(engine),
        }  # fmt: skip

    def stand_in_loss(self) -> torch.Tensor:
        """The divergence on `idle_example`, for `idle_micro_step`: the same forwards as a real chunk, the
        teacher's too (under ZeRO-3 it is partitioned and gathers in every forward)."""
        return self.divergence([idle_example(self.tokenizer.eos_token_id)]).sum()

    def divergence(self, examples: list) -> torch.Tensor:
        """Per-token divergence [M] of the student (with grad) from the teacher on `examples`."""
        algo = self.cfg.algo
        if DIVERGENCES.get(algo.divergence).full_vocab:
            teacher = teacher_logits(self.teacher, examples, chunk_size=algo.chunk_size)
            return student_vocab_divergence(self.engine, examples, teacher, algo.divergence, algo.beta, algo.chunk_size)
        with torch.no_grad():
            teacher = target_logprobs(self.teacher, examples)
        return DIVERGENCES.get(algo.divergence).fn(target_logprobs(self.engine, examples), teacher)

    def evaluate(self) -> dict[str, float]:
        """Per-token distances of the student to the teacher (and oracle) on held-out responses (module doc)."""
        cfg, algo, sources, result = self.cfg, self.cfg.algo, {}, {}
        if "student" in algo.eval_responses and self.eval_prompts:
            request = sampled_eval_request(cfg.eval, n=max(cfg.eval.samples, 1))
            sources[""] = self.sample(self.eval_prompts[rank() :: world_size()], request)
        if self.eval_offline:
            sources["dataset_"] = self.eval_offline[rank() :: world_size()]
        others = {"teacher": self.teacher, **({"oracle": self.oracle} if self.oracle is not None else {})}
        exact = full_vocab_divergence(algo.divergence).name
        self.engine.eval()
        for prefix, examples in sources.items():
            means = held_out_distances(self.engine, others, examples, cfg.train.micro_batch_size, algo.chunk_size,
                                       padding_example(self.tokenizer))  # fmt: skip
            result.update({prefix + key: value for key, value in means.items()})
            result.update({f"{prefix}{n}_distance": means[f"{n}_{exact}"] for n in others if means})
        self.engine.train()
        return result

    def export(self, out_dir: Path) -> None:
        export_hf(self.engine.module.policy, self.tokenizer, out_dir, self.cfg.deepspeed.zero_stage)
