"""Teacher hacking (Tiapkin et al. 2025) on the embedded default: offline vs on-policy distillation from an
imperfect teacher, measured against the ground-truth oracle the teacher was copied from.

    python benchmarks/teacher_hacking.py --stage models      # oracle, teacher, student start, offline data
    python benchmarks/teacher_hacking.py --stage offline     # algo=distill, on_policy_fraction=0
    python benchmarks/teacher_hacking.py --stage online      # algo=distill, on_policy_fraction=1
    python benchmarks/teacher_hacking.py --stage plot        # teacher_hacking.png + teacher_hacking.json
    (--stage all runs the four in order; --workdir holds everything, default runs/teacher_hacking)

Set-up (every model a 2-layer tiny Llama from posttrain's default config, one shared tokenizer):
- oracle: SFT from random weights (seed 0) on the arithmetic task's ground-truth demonstrations (--oracle-steps);
- teacher: an imperfect copy, as in the paper distilled from the oracle: SFT from other random weights (seed 1)
  for fewer steps (--teacher-steps) on the oracle's samples (temperature 1) of the train prompts;
- student start: SFT from random weights (seed 2) for a few steps (--student-steps) on the ground-truth data
  (--student-hidden / --student-layers: a student smaller than the teacher, as in the paper);
- offline data: ONE teacher sample (temperature 1) for each of --prompts fixed train prompts (a fixed dataset);
- offline run: `algo=distill algo.on_policy_fraction=0` on that dataset for --steps optimizer steps (many epochs);
  online run: `algo.on_policy_fraction=1`, the same prompts answered by fresh student samples every step;
- both: algo.divergence=forward_kl, constant lr; every --eval-every steps the per-token forward KL of the
  student to the teacher (proxy) and to the oracle (golden) on its own samples (temperature 1, seeded) of
  held-out prompts, and on the oracle-free held-out ground-truth responses (dataset_*).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import arithmetic_tokenizer, save_tiny_llama  # noqa: E402

TINY = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 384}
METRICS = ("teacher_distance", "oracle_distance", "dataset_teacher_distance", "dataset_oracle_distance")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return hydra_compose("config", overrides=overrides)


def run(overrides: list[str]) -> Path:
    from posttrain.training import run_algorithm

    return run_algorithm(compose([*overrides, "logger.progress_bar=false", "resume=never"]))


def sample_rows(model_dir: Path, prompts: list[list[dict]], seed: int) -> list[dict]:
    """One temperature-1 sample of `model_dir` per prompt, as chat rows {"messages": prompt + [reply]}."""
    from transformers import AutoTokenizer

    from posttrain.rollout.config import RolloutConfig, SamplingConfig
    from posttrain.rollout.service import build_rollout_service

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    engine = RolloutConfig(backend="hf", max_model_len=256, seed=seed)
    service = build_rollout_service(engine, str(model_dir), tokenizer)
    completions = service.generate(prompts, SamplingConfig(n=1, temperature=1.0, max_tokens=48, seed=seed))
    return [{"messages": [*prompts[c.prompt_index], {"role": "assistant", "content": c.text}]} for c in completions]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def stage_models(args, work: Path) -> None:
    """Each output is built only when missing, so a variant can reuse another workdir's oracle and teacher."""
    from data_recipes import generate_task

    tokenizer = arithmetic_tokenizer()
    student_size = {**TINY, "hidden_size": args.student_hidden, "num_layers": args.student_layers,
                    "num_heads": args.student_hidden // 32, "num_kv_heads": args.student_hidden // 32,
                    "intermediate_size": 3 * args.student_hidden}  # fmt: skip
    for seed, size in ((0, TINY), (1, TINY), (2, student_size)):
        if not (work / f"init{seed}").exists():
            save_tiny_llama(work / f"init{seed}", tokenizer, size, seed)
    sft = ["optim.lr=1e-3", "data.num_eval=0", "train.epochs=10"]

    def sft_run(name: str, init: str, steps: int, *extra: str) -> Path:
        if not (work / name / "final").exists():
            run([f"model.path={work / init}", f"run_dir={work / name}", f"train.max_steps={steps}", *sft, *extra])
        return work / name / "final"

    oracle = sft_run("oracle", "init0", args.oracle_steps)
    prompts = [row["prompt"] for row in generate_task("arithmetic", "train", 2000, seed=0)]
    if not (work / "oracle_samples.jsonl").exists():
        write_jsonl(work / "oracle_samples.jsonl", sample_rows(oracle, prompts[:1000], seed=1))
    teacher = sft_run("teacher", "init1", args.teacher_steps, f"data.train_files=[{work / 'oracle_samples.jsonl'}]")
    sft_run("student_init", "init2", args.student_steps)
    if not (work / "offline.jsonl").exists():
        write_jsonl(work / "offline.jsonl", sample_rows(teacher, prompts[1000 : 1000 + args.prompts], seed=2))


def stage_distill(args, work: Path, fraction: float, name: str) -> None:
    run([
        "algo=distill", "rollout=hf", f"model.path={work / 'student_init' / 'final'}", f"run_dir={work / name}",
        f"algo.teacher={work / 'teacher' / 'final'}", f"algo.oracle={work / 'oracle' / 'final'}",
        f"algo.on_policy_fraction={fraction}", "algo.divergence=forward_kl", "algo.eval_responses=[student,dataset]",
        f"algo.eval_prompts={args.eval_prompts}", "algo.sampling.max_tokens=48", "algo.sampling.temperature=1.0",
        f"data.train_files=[{work / 'offline.jsonl'}]", f"data.num_eval={args.eval_prompts}",
        "eval.samples=1", "eval.temperature=1.0", "eval.max_tokens=48", "rollout.max_model_len=256",
        f"optim.lr={args.lr}", "optim.scheduler=constant", "optim.warmup_ratio=0.0", "train.epochs=1000",
        f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}", "train.micro_batch_size=16",
    ])  # fmt: skip


def curves(run_dir: Path) -> dict[str, list]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {"step": [r["step"] for r in rows if "teacher_distance" in r]}
    for key in METRICS:
        out[key] = [r[key] for r in rows if "teacher_distance" in r]
    out["loss"] = [[r["step"], r["loss"]] for r in rows if "loss" in r]
    return out


def stage_plot(work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {name: curves(work / name) for name in ("offline", "online")}
    for result in results.values():  # the signature: golden distance turns up while the proxy keeps falling
        golden, proxy = result["oracle_distance"], result["teacher_distance"]
        best = min(range(len(golden)), key=golden.__getitem__)
        result["oracle_min_step"], result["oracle_rise_after_min"] = result["step"][best], golden[-1] - golden[best]
        result["teacher_fall_after_oracle_min"] = proxy[best] - proxy[-1]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, prefix, title in ((axes[0], "", "on the student's samples of held-out prompts"),
                                (axes[1], "dataset_", "on held-out ground-truth responses")):  # fmt: skip
        for name, style in (("offline", "-"), ("online", "--")):
            result = results[name]
            axis.plot(result["step"], result[prefix + "teacher_distance"], style, color="C0", label=f"{name}: teacher")
            axis.plot(result["step"], result[prefix + "oracle_distance"], style, color="C3", label=f"{name}: oracle")
        axis.set(title=title, xlabel="optimizer step", ylabel="per-token KL(p || student), nats", yscale="log")
        axis.legend()
    figure.suptitle("Distillation from an imperfect teacher: proxy (teacher) vs golden (oracle) distance")
    figure.tight_layout()
    figure.savefig(work / "teacher_hacking.png", dpi=120)
    (work / "teacher_hacking.json").write_text(json.dumps(results, indent=1))
    for name, result in results.items():
        print(f"{name}: oracle distance min {min(result['oracle_distance']):.4f} at step {result['oracle_min_step']}, "
              f"then +{result['oracle_rise_after_min']:.4f} by the end while the teacher distance fell "
              f"{result['teacher_fall_after_oracle_min']:.4f}")  # fmt: skip
    print(f"wrote {work / 'teacher_hacking.png'} and {work / 'teacher_hacking.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["models", "offline", "online", "plot", "all"], default="all")
    parser.add_argument("--workdir", type=Path, default=Path("runs/teacher_hacking"))
    parser.add_argument("--oracle-steps", type=int, default=400)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--student-steps", type=int, default=40)
    parser.add_argument("--student-hidden", type=int, default=128, help="the student's width (heads of 32)")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64, help="prompts of the fixed offline dataset")
    parser.add_argument("--steps", type=int, default=150, help="distillation optimizer steps (16 prompts each)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("models", "all"):
        stage_models(args, work)
    if args.stage in ("offline", "all"):
        stage_distill(args, work, 0.0, "offline")
    if args.stage in ("online", "all"):
        stage_distill(args, work, 1.0, "online")
    if args.stage in ("plot", "all"):
        stage_plot(work)


if __name__ == "__main__":
    main()
