"""CPU benchmark: one DPO training step of posttrain vs TRL's DPOTrainer on the same model, pairs and batch.

    python benchmarks/dpo_vs_trl.py                                   # hidden 512, 8 layers, vocab 8192
    python benchmarks/dpo_vs_trl.py --hidden 256 --layers 4 --steps 4 # quicker

Set-up (shared, in --workdir): a Llama model built from config (--hidden, --layers, --vocab; seed 0) saved
as a Hugging Face directory both frameworks load, a locally trained tokenizer with posttrain's chat template,
and synthetic preference pairs (column-addition arithmetic with --max-digits digits: ~100 tokens per
sequence). Both train the sigmoid DPO loss (beta 0.1), AdamW lr 1e-5, --pairs pairs per step, fp32, no
gradient checkpointing, the same torch thread count, each method in its own fresh subprocess.

Methods:
- posttrain: `algo=dpo` (cached reference log-probs, precomputed before step 1; chosen + rejected in one
  packed forward; fused log-prob kernel; DeepSpeed ZeRO-0 engine);
- trl: `DPOTrainer` defaults (a live reference model forward every step);
- trl_precompute: `DPOTrainer(precompute_ref_log_probs=True)`, the fair like-for-like with our cache.

Step time: median wall-clock of the optimizer steps after --warmup steps (reference precompute and set-up
excluded, reported separately). Peak memory: the process's peak resident set (VmHWM) during the training
steps, after a reset (/proc/self/clear_refs) at the first step: the model, optimizer state, and (trl) the
reference model, plus the step's activations. The load average is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import reset_peak, rss_mb

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("posttrain", "trl", "trl_precompute")


def prepare(workdir: Path, args) -> None:
    """Tokenizer, model directory and pairs shared by every method."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO_ROOT))
    from data_recipes import generate_task
    from posttrain.models.tokenizer import train_tokenizer

    rows = generate_task(
        "arithmetic_preference", "train", args.num_pairs, 0, max_digits=args.max_digits, operations="+", steps=True
    )
    texts = [m["content"] for row in rows for key in ("prompt", "chosen", "rejected") for m in row[key]]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    with (workdir / "pairs.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps({key: row[key] for key in ("prompt", "chosen", "rejected")}) + "\n")


def run_posttrain(workdir: Path, args) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO_ROOT))
    from hydra import compose, initialize_config_dir

    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs
    from posttrain.trainers import get_algorithm
    from posttrain.training import start_run

    register_configs()
    overrides = [
        "algo=dpo",
        "data=jsonl",
        f"data.train_files=[{workdir / 'pairs.jsonl'}]",
        "data.max_length=1024",
        f"model.path={workdir / 'model'}",
        "model.dtype=float32",
        "model.gradient_checkpointing=false",
        "logger.progress_bar=false",
        f"train.micro_batch_size={args.pairs}",
        f"train.max_steps={args.steps}",
        "optim.lr=1e-5",
        "optim.warmup_ratio=0",
        "algo.beta=0.1",
        f"algo.reference.cache_dir={workdir / f'cache-{os.getpid()}'}",
        f"run_dir={workdir / f'run-{os.getpid()}'}",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    started = time.perf_counter()
    algorithm = get_algorithm("dpo")
    trainer = algorithm.entry(start_run(cfg, algorithm))
    setup_seconds = time.perf_counter() - started
    times = []
    reset_peak()
    for step in range(args.steps):
        started = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - started)
    return {"step_seconds": times, "peak_rss_mb": rss_mb("VmHWM"), "setup_seconds": setup_seconds}


def run_trl(workdir: Path, args, precompute: bool) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype="float32")
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if not times and self.__dict__.get("started") is None:
                reset_peak()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)

    config = DPOConfig(
        output_dir=str(workdir / f"trl-{os.getpid()}"),
        per_device_train_batch_size=args.pairs,
        max_steps=args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="linear",
        warmup_steps=0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=1024,
        precompute_ref_log_probs=precompute,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        gradient_checkpointing=False,
    )
    started = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    setup_seconds = time.perf_counter() - started
    trainer.train()
    return {"step_seconds": times, "peak_rss_mb": rss_mb("VmHWM"), "setup_seconds": setup_seconds}


def child(method: str, workdir: Path, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = (
        run_posttrain(workdir, args) if method == "posttrain" else run_trl(workdir, args, method == "trl_precompute")
    )
    print("RESULT " + json.dumps(result))


def summarise(results: dict, args) -> str:
    lines = [
        f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.pairs} pairs/step; "
        f"{args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "| method | median step (s) | peak RSS (MB) | set-up (s) | step time vs posttrain |",
        "|---|---|---|---|---|",
    ]
    ours = statistics.median(results["posttrain"]["step_seconds"][args.warmup :])
    for method, result in results.items():
        median = statistics.median(result["step_seconds"][args.warmup :])
        lines.append(
            f"| {method} | {median:.3f} | {result['peak_rss_mb']:.0f} | {result['setup_seconds']:.1f} | "
            f"{median / ours:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--num-pairs", type=int, default=64)
    parser.add_argument("--max-digits", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dpo_vs_trl"))
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workdir, args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    prepare(args.workdir, args)
    results = {}
    passthrough, skip = [], False
    for arg in sys.argv[1:]:  # everything but --methods / --workdir / --out, which the parent owns
        if skip:
            skip = False
            continue
        if arg.split("=")[0] in ("--methods", "--workdir", "--out"):
            skip = "=" not in arg
            continue
        passthrough.append(arg)
    for method in args.methods.split(","):
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": "65536",
            "DS_ACCELERATOR": "cpu",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO_ROOT),
        }
        done = subprocess.run(
            [sys.executable, __file__, *passthrough, "--workdir", str(args.workdir), "--child", method],
            capture_output=True,
            text=True,
            env=env,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"{method} failed:\n{done.stderr[-4000:]}")
        results[method] = json.loads(lines[-1][len("RESULT ") :])
        print(f"{method}: steps {[round(t, 3) for t in results[method]['step_seconds']]}", flush=True)
    print(summarise(results, args))
    if args.out:
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
