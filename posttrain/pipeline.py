"""The Tülu 3 pipeline: SFT -> DPO -> RLVR as one command (`posttrain algo=pipeline`).

Each stage is an ordinary `posttrain` run in its own process (`algo.launcher` + `-m posttrain` + the
stage's overrides), in `<run_dir>/<stage>/`, starting from the previous stage's `final/`. After every
stage the stage's `final/` is evaluated with `posttrain eval` (evals/runner.py) into
`<run_dir>/<stage>/eval.json`. At the end the pipeline prints a table of the eval metrics per stage,
writes it to `<run_dir>/pipeline.json`, and plots the training curves and the eval metric per stage
into `<run_dir>/pipeline.png`.

A killed pipeline resumes: a stage whose `final/` and `eval.json` exist is skipped, and a stage cut
off part-way continues from its newest checkpoint (each stage runs with `resume=auto`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from posttrain.config import EvalSamplingConfig, eval_sampling_problems
from posttrain.errors import ConfigError, PosttrainError
from posttrain.trainers import ALGORITHMS, register_algo

log = logging.getLogger("posttrain")


@dataclass
class PipelineStageConfig:
    name: str = MISSING  # also the stage's run dir: <run_dir>/<name>
    overrides: list[str] = field(default_factory=list)  # the stage's `posttrain` overrides (algo=..., recipes, ...)


@dataclass
class PipelineEvalConfig:
    """`posttrain eval` after every stage (evals/runner.py): which tasks, how many prompts, and how to sample."""

    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    num: int = 200  # prompts per task
    backend: str = "vllm"
    sampling: EvalSamplingConfig = field(default_factory=lambda: EvalSamplingConfig(samples=4, max_tokens=64))


@dataclass
class PipelineAlgoConfig:
    """Stages run in order, each from the previous stage's final/."""

    name: str = "pipeline"
    stages: list[PipelineStageConfig] = field(default_factory=list)
    initial_model: str | None = None  # the first stage's model.path (null: the stage's own model config)
    eval_initial: bool = False  # also evaluate initial_model before the first stage
    launcher: list[str] = field(default_factory=list)  # e.g. [torchrun, --nproc_per_node=8]; empty: this Python
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    plot_metric: str = "arithmetic/greedy_accuracy"  # the eval metric drawn per stage in pipeline.png


class StageFailed(PosttrainError):
    """A stage's process exited with an error; its log names the cause."""


def stage_algo(stage_dir: Path) -> str:
    """The algorithm a finished stage ran, from the config.yaml it wrote."""
    config = stage_dir / "config.yaml"
    return str(OmegaConf.load(config).algo.name) if config.is_file() else "sft"


def check_config(cfg) -> None:
    algo = cfg.algo
    problems = eval_sampling_problems(algo.eval.sampling, "algo.eval.sampling")
    if problems:
        raise ConfigError("; ".join(problems))
    if not algo.stages:
        raise ConfigError("algo.stages is empty: list the stages, e.g. [{name: sft, overrides: [algo=sft]}, ...]")
    names = [stage.name for stage in algo.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"algo.stages: stage names must be unique (they name run dirs); got {names}")
    for stage in algo.stages:
        bad = [o for o in stage.overrides if o.split("=", 1)[0].lstrip("+") in ("run_dir", "model.path")]
        if bad:
            raise ConfigError(
                f"algo.stages[{stage.name}].overrides sets {bad}: the pipeline sets run_dir and model.path itself "
                "(use algo.initial_model for the first stage's model)"
            )


def posttrain_command(launcher: list[str], *arguments: str) -> list[str]:
    """`[launcher...] -m posttrain <arguments>`; an empty launcher means this Python interpreter."""
    return [*(launcher or [sys.executable]), "-m", "posttrain", *arguments]


def run_logged(command: list[str], log_path: Path, what: str) -> None:
    """Run `command` with its output appended to `log_path`; a failure names the log and its last lines."""
    log.info("%s: %s", what, " ".join(command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("a") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise StageFailed(f"{what} failed (exit {code}); full log: {log_path}\n{tail}")


def eval_arguments(eval_cfg, model_dir: Path, out: Path) -> list[str]:
    """`posttrain eval` arguments: the model, tasks, prompts and backend, and every field of the sampling schema
    as its flag (--samples, --temperature, --top-p, --max-tokens, --seed)."""
    arguments = ["eval", "--model", str(model_dir), "--num", str(eval_cfg.num), "--backend", eval_cfg.backend]
    for name, value in OmegaConf.to_container(eval_cfg.sampling).items():
        arguments += [f"--{name.replace('_', '-')}", str(value)]
    for task in eval_cfg.tasks:
        arguments += ["--task", task]
    return arguments + ["--out", str(out)]


def run_stage(cfg, stage, model_path: str | None, root: Path) -> Path:
    """Train `stage` (unless its final/ exists) and evaluate it (unless its eval.json exists); returns final/."""
    stage_dir = root / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / "final"
    if (final / "config.json").is_file():
        log.info("stage %s: %s exists, not retrained", stage.name, final)
    else:
        arguments = [*stage.overrides, f"run_dir={stage_dir}", f"seed={cfg.seed}", "resume=auto"]
        if model_path:
            arguments.append(f"model.path={model_path}")
        run_logged(
            posttrain_command(list(cfg.algo.launcher), *arguments), stage_dir / "stage.log", f"stage {stage.name}"
        )
    if not (stage_dir / "eval.json").is_file():
        # Evaluation runs single-process whatever the launcher: one engine reads the whole model.
        run_logged(
            posttrain_command([], *eval_arguments(cfg.algo.eval, final, stage_dir / "eval.json.tmp")),
            stage_dir / "eval.log",
            f"eval {stage.name}",
        )
        os.replace(stage_dir / "eval.json.tmp", stage_dir / "eval.json")
    return final


def stage_metrics(stage_dir: Path) -> dict[str, float]:
    """The eval metrics of one stage, flattened to `<task>/<metric>` (numbers only)."""
    results = json.loads((stage_dir / "eval.json").read_text())
    return {
        f"{task}/{name}": value
        for task, metrics in results["tasks"].items()
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "num_prompts"
    }


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """One row per stage, one column per eval metric."""
    names = sorted({name for _, metrics in rows for name in metrics})
    header = ["stage", *names]
    body = [[stage, *(f"{metrics[name]:.3f}" if name in metrics else "-" for name in names)] for stage, metrics in rows]
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths))
        )
        for line in [header, *body]
    ]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def plot(root: Path, stages: list, rows: list[tuple[str, dict[str, float]]], metric: str) -> Path | None:
    """pipeline.png: each stage's training curve, then `metric` per stage. Skipped (with a warning) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no pipeline.png (pip install matplotlib)")
        return None
    from posttrain.logging import read_metrics

    figure, axes = plt.subplots(1, len(stages) + 1, figsize=(4 * (len(stages) + 1), 3.2))
    for axis, stage in zip(axes, stages):
        records = read_metrics(root / stage.name)
        algorithm = stage_algo(root / stage.name)
        curve = ALGORITHMS.get(algorithm).curve if algorithm in ALGORITHMS else ("loss",)
        name = next((key for key in curve if any(key in r for r in records)), "loss")
        points = [(r["step"], r[name]) for r in records if name in r]
        if points:
            axis.plot(*zip(*points))
        axis.set_title(f"{stage.name}: {name}")
        axis.set_xlabel("step")
    values = [metrics.get(metric, float("nan")) for _, metrics in rows]
    axes[-1].bar([stage for stage, _ in rows], values)
    axes[-1].set_title(metric)
    axes[-1].set_ylim(0, 1)
    figure.tight_layout()
    path = root / "pipeline.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@register_algo("pipeline", schema=PipelineAlgoConfig)
def main(cfg) -> Path:
    from posttrain.run_dir import write_config

    check_config(cfg)
    root = Path(cfg.run_dir)
    write_config(root, cfg)
    model_path = cfg.algo.initial_model
    rows = []
    if cfg.algo.eval_initial and model_path:
        initial_dir = root / "initial"
        initial_dir.mkdir(parents=True, exist_ok=True)
        if not (initial_dir / "eval.json").is_file():
            run_logged(
                posttrain_command([], *eval_arguments(cfg.algo.eval, Path(model_path), initial_dir / "eval.json.tmp")),
                initial_dir / "eval.log",
                "eval initial",
            )
            os.replace(initial_dir / "eval.json.tmp", initial_dir / "eval.json")
        rows.append(("initial", stage_metrics(initial_dir)))
    for stage in cfg.algo.stages:
        model_path = str(run_stage(cfg, stage, model_path, root))
        rows.append((stage.name, stage_metrics(root / stage.name)))
        log.info("stage %s: %s", stage.name, json.dumps(rows[-1][1]))
    table = format_table(rows)
    print(table, flush=True)
    (root / "pipeline.json").write_text(
        json.dumps(
            {"stages": [{"stage": s, **m} for s, m in rows], "config": OmegaConf.to_container(cfg.algo, resolve=True)},
            indent=2,
        )
        + "\n"
    )
    picture = plot(root, list(cfg.algo.stages), rows, cfg.algo.plot_metric)
    log.info("pipeline done: %s%s", root / "pipeline.json", f", {picture}" if picture else "")
    return root
