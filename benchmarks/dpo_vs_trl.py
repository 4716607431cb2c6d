"""CPU benchmark: one DPO training step of posttrain vs TRL's DPOTrainer on the same model, pairs and batch.

    python benchmarks/dpo_vs_trl.py --out benchmarks/results/dpo_vs_trl.json   # full size: hidden 512, 8 layers
    python benchmarks/dpo_vs_trl.py --hidden 256 --layers 4 --rounds 3          # reduced size (make bench)
    python benchmarks/dpo_vs_trl.py --smoke                                      # tiny: proves the script runs

Set-up (shared, in --workdir): a Llama model built from config (--hidden, --layers, --vocab; seed 0) saved
as a Hugging Face directory both frameworks load, a locally trained tokenizer with posttrain's chat template,
and synthetic preference pairs: column-addition arithmetic with --min-digits..--max-digits-digit operands
(evenly spread), each digit one line of column work, so the default 8-34 digits give sequences of ~130-510
tokens (the set-up prints the min / median / max). Both train the sigmoid DPO loss (beta 0.1), AdamW lr 1e-5,
--pairs pairs per step (16), fp32, no gradient checkpointing, the same torch thread count.

Methods:
- posttrain: `algo=dpo` (cached reference log-probs, precomputed before step 1; chosen + rejected in one
  packed forward; fused log-prob kernel; DeepSpeed ZeRO-0 engine);
- trl: `DPOTrainer` defaults (a live reference model forward every step);
- trl_precompute: `DPOTrainer(precompute_ref_log_probs=True)`, the fair like-for-like with our cache.

Protocol (benchmarks/protocol.py): --rounds interleaved rounds, each method once per round in its own fresh
subprocess, the order rotated per round; per-round ratios (a TRL method's step time / posttrain's) by wall clock
and by process CPU time, with their median and min-max; the load average before and after each round and a
WARNING when it exceeded the number of cores. Step time: a method's median optimizer step after --warmup steps
(reference precompute and set-up excluded, reported separately). Peak memory: the process's peak resident set
(VmHWM) during the training steps, after a reset (/proc/self/clear_refs) at the first step: the model,
optimizer state, and (trl) the reference model, plus the step's activations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from common import reset_peak, rss_mb
from protocol import compare, format_comparisons, protocol_summary, run_rounds, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("posttrain", "trl", "trl_precompute")
MIN_DIGITS, MAX_DIGITS = 8, 34  # operand digits: sequences of ~130-510 tokens (printed by prepare)


def preference_rows(count: int, min_digits: int, max_digits: int) -> list[dict]:
    """`count` column-addition pairs whose operands have `min_digits`..`max_digits` digits, the counts spread evenly
    (each digit count a `generate_task` call seeded by it), shuffled with seed 0. Longer operands mean longer
    column work: every digit is one "a + b + carry = t" line, so sequence lengths spread with the range."""
    import random

    from data_recipes import generate_task

    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"--min-digits {min_digits} must be between 1 and --max-digits {max_digits}")
    levels = list(range(min_digits, max_digits + 1))
    rows = []
    for index, digits in enumerate(levels):
        share = count // len(levels) + (index < count % len(levels))
        if share:
            rows += generate_task(
                "arithmetic_preference", "train", share, digits, max_digits=digits, operations="+", steps=True
            )
    random.Random(0).shuffle(rows)
    return rows


def sequence_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Tokens of prompt + chosen and prompt + rejected, rendered with the chat template."""
    return [
        len(tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=True, return_dict=True)["input_ids"])
        for row in rows
        for key in ("chosen", "rejected")
    ]


def prepare(workdir: Path, args) -> None:
    """Tokenizer, model directory and pairs shared by every method."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO_ROOT))
    from posttrain.models.tokenizer import train_tokenizer

    rows = preference_rows(args.num_pairs, args.min_digits, args.max_digits)
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
    lengths = sorted(sequence_lengths(tokenizer, rows))
    print(
        f"pairs: {len(rows)}, {args.min_digits}-{args.max_digits}-digit operands; sequence tokens min "
        f"{lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}",
        flush=True,
    )
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
    times, cpu_times = [], []
    reset_peak()
    for step in range(args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.train_step(step)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
        "peak_rss_mb": rss_mb("VmHWM"),
        "setup_seconds": setup_seconds,
    }


def run_trl(workdir: Path, args, precompute: bool) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype="float32")
    times: list[float] = []
    cpu_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if not times and self.__dict__.get("started") is None:
                reset_peak()
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)
            cpu_times.append(time.process_time() - self.cpu_started)

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
    return {
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
        "peak_rss_mb": rss_mb("VmHWM"),
        "setup_seconds": setup_seconds,
    }


def child(method: str, workdir: Path, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = (
        run_posttrain(workdir, args) if method == "posttrain" else run_trl(workdir, args, method == "trl_precompute")
    )
    print("RESULT " + json.dumps(result))


def step_cost(result: dict, warmup: int) -> tuple[float, float]:
    """(wall, CPU) median seconds per optimizer step after the warm-up: the protocol's per-round cost."""
    return statistics.median(result["step_seconds"][warmup:]), statistics.median(result["step_cpu_seconds"][warmup:])


def summarise(rounds: list[dict], methods: list[str], args) -> str:
    """Per method: medians over the rounds of the median step time (wall, CPU), peak RSS and set-up time."""
    lines = [
        f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.pairs} pairs/step; "
        f"{args.threads} torch thread(s); {len(rounds)} round(s), medians over the steps after {args.warmup} "
        "warm-up, then over rounds",
        f"{'method':<15} {'s/step':>7} {'cpu-s/step':>10} {'peak RSS MB':>11} {'set-up s':>8}",
    ]
    for method in methods:
        runs = [r["results"][method] for r in rounds if "error" not in r["results"][method]]
        if not runs:
            lines.append(f"{method:<15} failed: {rounds[-1]['results'][method]['error'][:2000]}")
            continue
        costs = [step_cost(run, args.warmup) for run in runs]
        wall, cpu = statistics.median(c[0] for c in costs), statistics.median(c[1] for c in costs)
        peak, setup = max(run["peak_rss_mb"] for run in runs), statistics.median(run["setup_seconds"] for run in runs)
        lines.append(f"{method:<15} {wall:>7.3f} {cpu:>10.3f} {peak:>11.0f} {setup:>8.1f}")
    return "\n".join(lines)


def run_method(method: str, round_index: int, passthrough: list[str], workdir: Path) -> dict:
    """One method in a fresh subprocess; its RESULT line, or {"error": ...}."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        [sys.executable, __file__, *passthrough, "--workdir", str(workdir), "--child", method],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit status {done.returncode}; stderr tail:\n{done.stderr[-4000:]}"}
    result = json.loads(lines[-1][len("RESULT ") :])
    print(f"{method} (round {round_index + 1}): steps {[round(t, 3) for t in result['step_seconds']]}", flush=True)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--pairs", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--num-pairs", type=int, help="pairs in the data set (default: --pairs x --steps)")
    parser.add_argument(
        "--min-digits", type=int, default=MIN_DIGITS, help="shortest operands (sets the shortest sequence)"
    )
    parser.add_argument(
        "--max-digits", type=int, default=MAX_DIGITS, help="longest operands (sets the longest sequence)"
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds: every method once per round, order rotated"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dpo_vs_trl"))
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, short pairs, 2 steps, 1 round: the script runs"
    )
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.pairs = 128, 2, 1024, 4
        args.min_digits, args.max_digits, args.steps, args.warmup, args.rounds = 4, 8, 2, 1, 1
    args.num_pairs = args.num_pairs or args.pairs * args.steps  # what the steps read: the reference cache covers it
    unknown = [method for method in args.methods.split(",") if method not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.workdir, args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    prepare(args.workdir, args)
    passthrough, skip = [], False
    for arg in sys.argv[1:] if argv is None else argv:  # all but --methods / --workdir / --out / --rounds
        if skip:
            skip = False
            continue
        if arg.split("=")[0] in ("--methods", "--workdir", "--out", "--rounds"):
            skip = "=" not in arg
            continue
        passthrough.append(arg)
    methods = args.methods.split(",")
    rounds = run_rounds(
        methods, args.rounds, lambda method, index: run_method(method, index, passthrough, args.workdir)
    )
    print(summarise(rounds, methods, args))
    peers = [method for method in methods if method != "posttrain"]
    comparisons = (
        compare(rounds, partial(step_cost, warmup=args.warmup), "posttrain", peers) if "posttrain" in methods else []
    )
    print()
    print(format_comparisons("dpo_vs_trl", comparisons, rounds))
    if args.out:
        write_results(
            args.out,
            {
                "protocol": protocol_summary("dpo_vs_trl", comparisons, rounds),
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "rounds": rounds,
            },
        )


if __name__ == "__main__":
    main()
