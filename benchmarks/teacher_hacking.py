"""Teacher hacking (Tiapkin et al. 2025) on the embedded default: offline vs on-policy distillation from an
imperfect teacher, measured against the ground-truth oracle the teacher was copied from.

    python benchmarks/teacher_hacking.py --stage models      # oracle, teacher, student start, offline data
    python benchmarks/teacher_hacking.py --stage offline     # algo=distill, on_policy_fraction=0
    python benchmarks/teacher_hacking.py --stage online      # algo=distill, on_policy_fraction=1
    python benchmarks/teacher_hacking.py --stage gap         # the teacher's own distance to the oracle (gap.json)
    python benchmarks/teacher_hacking.py --stage plot        # teacher_hacking.png + teacher_hacking.json
    (--stage all runs the five in order; --workdir holds everything, default runs/teacher_hacking)

Set-up (tiny Llamas from posttrain's default config, one shared tokenizer; every prompt, train or held-out, drawn
from the embedded default task as conf/data configures it: 2-digit addition written as column addition):
- oracle: 128 wide, 2 layers, SFT from random weights (seed 0) on the task's ground-truth demonstrations
  (--oracle-steps);
- teacher: an imperfect copy, as in the paper distilled from the oracle: SFT from other random weights (seed 1;
  --teacher-hidden / --teacher-layers, e.g. 1 layer for errors a capacity limit makes systematic) for
  --teacher-steps on the oracle's samples (temperature 1) of 1,000 train prompts;
- student start: SFT from random weights (seed 2; --student-hidden / --student-layers) for --student-steps on the
  ground-truth data, or on the oracle's samples as in the paper (--student-data oracle);
- offline data: --samples-per-prompt teacher samples (temperature 1) for each of --prompts fixed train prompts;
- offline run: `algo=distill algo.on_policy_fraction=0` on that dataset for --steps optimizer steps (many epochs);
  online run: `algo.on_policy_fraction=1`, the same prompts answered by fresh student samples every step;
- both: algo.divergence=--divergence (forward KL by default, reverse KL or JSD(0.5)), --lr with --scheduler (no
  warmup); every --eval-every steps the per-token divergence (that one; the three forms are all logged) of the
  student to the teacher (proxy) and to the oracle (golden) on its own samples (temperature 1, seeded) of held-out
  prompts, and (dataset_*) on held-out responses: the ground-truth demonstrations, or one
  oracle sample per prompt (--held-out oracle: the golden metric is then the Monte-Carlo estimate of the
  sequence-level KL(oracle || student) per token), or one teacher sample (--held-out teacher: the same for the
  proxy).
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
# the teacher's own golden distance in each --divergence's form (stage gap's keys, oracle samples)
TEACHER_GOLDEN = {"forward_kl": "kl_oracle_teacher", "reverse_kl": "kl_teacher_oracle", "jsd": "jsd_teacher_oracle"}
# what the *_distance metrics are under each --divergence, for the plot's labels ({p}: teacher, oracle or p)
DISTANCE_NAMES = {
    "forward_kl": "KL({p} || student)",
    "reverse_kl": "KL(student || {p})",
    "jsd": "JSD(0.5) of {p}, student",
}


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


def sample_rows(model_dir: Path, prompts: list[list[dict]], seed: int, n: int = 1) -> list[dict]:
    """`n` temperature-1 samples of `model_dir` per prompt, as chat rows {"messages": prompt + [reply]}; a sample
    with no text (the model ended at once) is dropped, since SFT and offline distillation refuse empty replies."""
    from transformers import AutoTokenizer

    from posttrain.rollout.config import RolloutConfig, SamplingConfig
    from posttrain.rollout.service import build_rollout_service

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    engine = RolloutConfig(backend="hf", max_model_len=256, seed=seed)
    service = build_rollout_service(engine, str(model_dir), tokenizer)
    completions = service.generate(prompts, SamplingConfig(n=n, temperature=1.0, max_tokens=48, seed=seed))
    rows = [{"messages": [*prompts[c.prompt_index], {"role": "assistant", "content": c.text}]}
            for c in completions if c.text.strip()]  # fmt: skip
    if len(rows) < len(completions):
        print(f"{model_dir}: dropped {len(completions) - len(rows)} empty samples of {len(completions)}")
    return rows


def task_prompts(split: str, count: int) -> list[list[dict]]:
    """The first `count` prompts of the embedded default task's `split`, drawn with the generator and arguments of
    the composed default config (conf/data), so that distillation sees the prompt distribution the oracle learnt."""
    from data_recipes import generate_task

    data = compose([]).data
    rows = generate_task(data.generator, split, count, data.seed, **dict(data.generator_kwargs))
    return [row["prompt"] for row in rows]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def model_size(hidden: int, layers: int) -> dict[str, int]:
    """A tiny Llama `hidden` wide (heads of 32, MLP 3x) and `layers` deep."""
    return {"hidden_size": hidden, "num_layers": layers, "num_heads": hidden // 32, "num_kv_heads": hidden // 32,
            "intermediate_size": 3 * hidden}  # fmt: skip


def stage_models(args, work: Path) -> None:
    """Each output is built only when missing, so a variant can reuse another workdir's oracle and teacher."""
    tokenizer = arithmetic_tokenizer()
    sizes = (
        TINY,
        model_size(args.teacher_hidden, args.teacher_layers),
        model_size(args.student_hidden, args.student_layers),
    )
    for seed, size in enumerate(sizes):
        if not (work / f"init{seed}").exists():
            save_tiny_llama(work / f"init{seed}", tokenizer, size, seed)
    sft = ["optim.lr=1e-3", "data.num_eval=0", "train.epochs=10"]

    def sft_run(name: str, init: str, steps: int, *extra: str) -> Path:
        if not (work / name / "final").exists():
            run([f"model.path={work / init}", f"run_dir={work / name}", f"train.max_steps={steps}", *sft, *extra])
        return work / name / "final"

    oracle = sft_run("oracle", "init0", args.oracle_steps)
    prompts = task_prompts("train", 2000)
    if not (work / "oracle_samples.jsonl").exists():
        write_jsonl(work / "oracle_samples.jsonl", sample_rows(oracle, prompts[:1000], seed=1))
    oracle_data = f"data.train_files=[{work / 'oracle_samples.jsonl'}]"
    teacher = sft_run("teacher", "init1", args.teacher_steps, oracle_data)
    sft_run("student_init", "init2", args.student_steps, *([oracle_data] if args.student_data == "oracle" else []))
    if not (work / "offline.jsonl").exists():
        offline_prompts = prompts[1000 : 1000 + args.prompts]
        write_jsonl(work / "offline.jsonl", sample_rows(teacher, offline_prompts, 2, args.samples_per_prompt))
    held_out = work / f"held_out_{args.held_out}.jsonl"
    if args.held_out != "ground_truth" and not held_out.exists():
        model = {"oracle": oracle, "teacher": teacher}[args.held_out]
        write_jsonl(held_out, sample_rows(model, task_prompts("eval", args.eval_prompts), 3))


def stage_distill(args, work: Path, fraction: float, name: str, student: Path | None = None, steps: int = 0) -> None:
    student = student or work / "student_init" / "final"
    run([
        "algo=distill", "rollout=hf", f"model.path={student}", f"run_dir={work / name}",
        f"algo.teacher={work / 'teacher' / 'final'}", f"algo.oracle={work / 'oracle' / 'final'}",
        f"algo.on_policy_fraction={fraction}", f"algo.divergence={args.divergence}",
        "algo.eval_responses=[student,dataset]",
        f"algo.eval_prompts={args.eval_prompts}", "algo.sampling.max_tokens=48", "algo.sampling.temperature=1.0",
        f"data.train_files=[{work / 'offline.jsonl'}]", f"data.num_eval={args.eval_prompts}",
        "eval.samples=1", "eval.temperature=1.0", "eval.max_tokens=48", "rollout.max_model_len=256",
        f"optim.lr={args.lr}", f"optim.scheduler={args.scheduler}", "optim.warmup_ratio=0.0", "train.epochs=1000",
        f"train.max_steps={steps or args.steps}", f"train.eval_every={1 if steps else args.eval_every}",
        "train.micro_batch_size=16",
        *([f"data.eval_files=[{work / f'held_out_{args.held_out}.jsonl'}]"] if args.held_out != "ground_truth" else []),
    ])  # fmt: skip


def stage_gap(args, work: Path) -> None:
    """How far the teacher itself is from the oracle, by the trainer's own eval: a distillation run with the ORACLE as
    the student, read at its step-0 eval (before any update), so that its teacher_forward_kl is KL(teacher || oracle)
    and its teacher_reverse_kl KL(oracle || teacher), on the oracle's samples of the held-out prompts and (dataset_)
    on the held-out responses. The teacher's golden distance (KL(oracle || teacher) for forward KL) is where a student
    that converges on the teacher ends; a student that starts below it moves away from the oracle as it learns
    the teacher (a rough guide from the README's runs: KL is no metric)."""
    if not (work / "gap" / "metrics.jsonl").exists():  # measured once per workdir, like the models
        stage_distill(args, work, 0.0, "gap", student=work / "oracle" / "final", steps=1)
    row = next(r for r in map(json.loads, (work / "gap" / "metrics.jsonl").read_text().splitlines())
               if "teacher_distance" in r)  # fmt: skip
    names = {"teacher_forward_kl": "kl_teacher_oracle", "teacher_reverse_kl": "kl_oracle_teacher",
             "teacher_jsd": "jsd_teacher_oracle"}  # fmt: skip
    gap = {prefix + name: row[prefix + key] for key, name in names.items() for prefix in ("", "dataset_")}
    (work / "gap.json").write_text(json.dumps(gap, indent=1))
    print(", ".join(f"{key} {value:.4f}" for key, value in gap.items()))


def curves(run_dir: Path) -> dict[str, list]:
    """Every eval point of a run: the METRICS and the per-divergence distances beside them (forward KL, reverse KL,
    JSD(0.5) to the teacher and the oracle), plus the training loss at every step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "teacher_distance" in r]
    keys = [*METRICS, *(key for key in evals[0] if key.endswith(("_forward_kl", "_reverse_kl", "_jsd")))]
    out = {"step": [r["step"] for r in evals], **{key: [r[key] for r in evals] for key in keys}}
    out["loss"] = [[r["step"], r["loss"]] for r in rows if "loss" in r]
    return out


def hacking_signature(result: dict, prefix: str) -> dict:
    """The paper's signature on one pair of curves: where the golden (oracle) distance is lowest, how much it rises
    after that by the end, and how much the proxy (teacher) distance falls over the same span."""
    golden, proxy = result[prefix + "oracle_distance"], result[prefix + "teacher_distance"]
    best = min(range(len(golden)), key=golden.__getitem__)
    return {"oracle_min_step": result["step"][best], "oracle_min": golden[best],
            "oracle_rise_after_min": golden[-1] - golden[best],
            "teacher_fall_after_oracle_min": proxy[best] - proxy[-1]}  # fmt: skip


def stage_plot(args, work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {name: curves(work / name) for name in ("offline", "online") if (work / name / "metrics.jsonl").exists()}
    for result in results.values():
        result["signature"] = {prefix or "student_": hacking_signature(result, prefix) for prefix in ("", "dataset_")}
    held_out = {"ground_truth": "ground-truth", "oracle": "oracle-sampled", "teacher": "teacher-sampled"}[args.held_out]
    distance = DISTANCE_NAMES[args.divergence]
    gap = json.loads((work / "gap.json").read_text()) if (work / "gap.json").exists() else None
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for axis, prefix, title in ((axes[0], "", "on the student's samples of held-out prompts"),
                                (axes[1], "dataset_", f"on {held_out} held-out responses")):  # fmt: skip
        for name, result in results.items():
            style = {"offline": "-", "online": "--"}[name]
            axis.plot(result["step"], result[prefix + "teacher_distance"], style, color="C0", label=f"{name}: teacher")
            axis.plot(result["step"], result[prefix + "oracle_distance"], style, color="C3", label=f"{name}: oracle")
        if gap and prefix:  # the teacher's own golden distance on the same responses (none on each student's own)
            teacher_golden = gap[prefix + TEACHER_GOLDEN[args.divergence]]
            axis.axhline(teacher_golden, color="grey", linestyle=":", label="the teacher's own golden distance")
        axis.set(title=title, xlabel="optimizer step", ylabel=f"per-token {distance.format(p='p')}, nats", yscale="log")
        axis.legend()
    for name, result in results.items():  # the paper's proxy-golden plot (its Figure 4)
        style = {"offline": "o-", "online": "s--"}[name]
        axes[2].plot(result["dataset_teacher_distance"], result["dataset_oracle_distance"], style, label=name)
    axes[2].set(title="held-out responses: proxy vs golden (paper Fig. 4)", xscale="log",
                yscale="log", xlabel=f"proxy: {distance.format(p='teacher')}",
                ylabel=f"golden: {distance.format(p='oracle')}")  # fmt: skip
    axes[2].legend()
    figure.suptitle("Distillation from an imperfect teacher: proxy (teacher) vs golden (oracle) distance")
    figure.tight_layout()
    figure.savefig(work / "teacher_hacking.png", dpi=120)
    (work / "teacher_hacking.json").write_text(
        json.dumps({"args": vars(args) | {"workdir": str(work)}, "teacher_to_oracle": gap, **results}, indent=1)
    )
    for name, result in results.items():
        for where, sig in result["signature"].items():
            print(f"{name} ({where[:-1]}): oracle distance min {sig['oracle_min']:.4f} "
                  f"at step {sig['oracle_min_step']}, "
                  f"then {sig['oracle_rise_after_min']:+.4f} by the end while the teacher distance fell "
                  f"{sig['teacher_fall_after_oracle_min']:+.4f}")  # fmt: skip
    print(f"wrote {work / 'teacher_hacking.png'} and {work / 'teacher_hacking.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["models", "offline", "online", "gap", "plot", "all"], default="all")
    parser.add_argument("--workdir", type=Path, default=Path("runs/teacher_hacking"))
    parser.add_argument("--oracle-steps", type=int, default=400)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--student-steps", type=int, default=40)
    parser.add_argument("--teacher-hidden", type=int, default=128, help="the teacher's width (heads of 32)")
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--student-hidden", type=int, default=128, help="the student's width (heads of 32)")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument(
        "--student-data",
        choices=["ground_truth", "oracle"],
        default="ground_truth",
        help="the student start's SFT data: the task's demonstrations or the oracle's samples (as in the paper)",
    )
    parser.add_argument("--prompts", type=int, default=64, help="prompts of the fixed offline dataset")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="teacher samples per offline prompt")
    parser.add_argument(
        "--held-out",
        choices=["ground_truth", "oracle", "teacher"],
        default="ground_truth",
        help="held-out responses for dataset_*: the task's demonstrations, or one oracle (teacher) sample each",
    )
    parser.add_argument("--steps", type=int, default=150, help="distillation optimizer steps (16 prompts each)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument(
        "--divergence",
        choices=list(DISTANCE_NAMES),
        default="forward_kl",
        help="the training divergence over the vocabulary (the *_distance metrics are its form; every form is logged)",
    )
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--scheduler", choices=["constant", "cosine", "linear"], default="constant")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("models", "all"):
        stage_models(args, work)
    if args.stage in ("offline", "all"):
        stage_distill(args, work, 0.0, "offline")
    if args.stage in ("online", "all"):
        stage_distill(args, work, 1.0, "online")
    if args.stage in ("gap", "all"):
        stage_gap(args, work)
    if args.stage in ("plot", "all"):
        stage_plot(args, work)


if __name__ == "__main__":
    main()
