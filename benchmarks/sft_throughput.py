"""SFT throughput on CPU: posttrain's SFT trainer against TRL's SFTTrainer, same model, data and batches.

    python benchmarks/sft_throughput.py                       # full size, every side, three rounds
    python benchmarks/sft_throughput.py --rounds 3 --out sft_throughput.json
    python benchmarks/sft_throughput.py --smoke               # tiny model, two sides, < 60 s

Set-up, shared by every side (built once per invocation in a temporary directory):
- a lexicon of random pseudo-words with Zipf frequencies; chat conversations (1-3 user/assistant turns) whose
  rendered length is spread uniformly up to --max-length tokens;
- a byte-level BPE tokenizer of --vocab-size tokens trained on that text with
  `posttrain.models.tokenizer.train_tokenizer` (its chat template marks assistant turns with {% generation %});
- a Llama model built from config with a fixed seed (--hidden-size, --layers, ...), saved with
  save_pretrained; every side loads these exact weights, fp32, sdpa attention;
- the step order: posttrain's seeded `StepPlan` picks the examples of every step; TRL gets the rows in
  that order with `train_sampling_strategy="sequential"`, so step s trains on the same 8 conversations on
  every side (checked: every side reports the same tokens per step).

Sides (each in its own subprocess, --threads torch threads, micro-batch --batch-size x accumulation 1,
AdamW (torch.optim.AdamW, for-loop implementation on both sides), same lr schedule, clipping 1.0, fp32,
no gradient checkpointing, assistant-only loss):
- posttrain            our real trainer (the registered SFT class built by `start_run` + `entry`, config composed
                       from conf/ like the CLI, `train_step` called step by step as `run_loop` does; no eval,
                       checkpoint or export): packed (padding-free) micro-batches, fused log-prob kernel
- posttrain-unfused    the same with model.fused_logprobs=false (PyTorch reference: full [N, V] logits)
- posttrain-padded     the same with data.packing=false (right-padded to the longest sequence)
- trl                  TRL's SFTTrainer with its defaults for this data: padded to the longest sequence
- trl-padding-free     SFTTrainer with padding_free=True (one packed row, sdpa with position_ids)

What is counted: tokens/s = non-pad input tokens (prompt + response, every token of every conversation in
the step) / wall-clock seconds of the timed steps. A step's time runs from the end of the previous optimizer
step to the end of this one, so it includes collation, forward, backward, clipping, the optimizer and the
trainer's own per-step bookkeeping. The first --warmup steps are not timed. The rounds follow
benchmarks/protocol.py: every side once per round in a fresh subprocess, the order rotated per round, per-round
ratios to each TRL side (wall clock and process CPU time) with median and min-max, the load average before and
after each round, and a WARNING when it exceeded the number of cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from protocol import compare, format_comparisons, protocol_summary, run_rounds, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATE = 1e-4
WARMUP_RATIO = 0.0  # no warm-up: both schedules then give the same lr at every step, so the losses must agree
SEED = 0

SIDES = {
    "posttrain": {"framework": "posttrain", "fused": True, "packing": True},
    "posttrain-unfused": {"framework": "posttrain", "fused": False, "packing": True},
    "posttrain-padded": {"framework": "posttrain", "fused": True, "packing": False},
    "trl": {"framework": "trl", "padding_free": False},
    "trl-padding-free": {"framework": "trl", "padding_free": True},
}
BASELINES = ("trl", "trl-padding-free")  # the ratio columns


# ---------------------------------------------------------------------------------------------------------------
# Shared assets: data, tokenizer, model (parent process)
# ---------------------------------------------------------------------------------------------------------------


def make_lexicon(rng: random.Random, size: int) -> list[str]:
    """`size` distinct pseudo-words of 1-4 consonant-vowel syllables."""
    onsets = "b c d f g h j k l m n p r s t v w z ch sh th br tr st pl gr".split()
    vowels = "a e i o u ai ea ou io".split()
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 4))))
    return sorted(words)


class WordSampler:
    """Words with Zipf frequencies, and sentences of them with light punctuation."""

    def __init__(self, rng: random.Random, lexicon_size: int):
        self.rng = rng
        self.words = make_lexicon(rng, lexicon_size)
        rng.shuffle(self.words)
        self.cumulative_weights = list(_accumulate(1.0 / (rank + 1) for rank in range(len(self.words))))

    def text(self, num_words: int) -> str:
        words = self.rng.choices(self.words, cum_weights=self.cumulative_weights, k=max(1, num_words))
        pieces = []
        for index, word in enumerate(words):
            pieces.append(word + ("." if index % 11 == 10 else ""))
        return " ".join(pieces).capitalize()


def _accumulate(values):
    total = 0.0
    for value in values:
        total += value
        yield total


def make_conversation(sampler: WordSampler, token_budget: int, tokens_per_word: float) -> list[dict]:
    """User/assistant turns whose rendered length is roughly `token_budget` tokens."""
    turns = sampler.rng.randint(1, 3)
    per_turn_words = max(4, int(token_budget / tokens_per_word / turns) - 4)
    messages = []
    for _ in range(turns):
        user_words = max(2, int(per_turn_words * sampler.rng.uniform(0.2, 0.5)))
        messages.append({"role": "user", "content": sampler.text(user_words)})
        messages.append({"role": "assistant", "content": sampler.text(per_turn_words - user_words)})
    return messages


def build_tokenizer(sampler: WordSampler, vocab_size: int, corpus_words: int):
    from posttrain.models.tokenizer import train_tokenizer

    texts = [sampler.text(200) for _ in range(corpus_words // 200)]
    return train_tokenizer(texts, vocab_size=vocab_size)


def build_conversations(sampler: WordSampler, tokenizer, count: int, max_length: int) -> list[dict]:
    """`count` rows {"messages": [...]}, rendered lengths spread uniformly over [max_length/16, max_length]."""
    from posttrain.data.chat import tokenize_conversation

    rows, tokens_per_word = [], 1.3
    while len(rows) < count:
        budget = sampler.rng.randint(max(16, max_length // 16), max_length)
        messages = make_conversation(sampler, budget, tokens_per_word)
        length = len(tokenize_conversation(tokenizer, messages).input_ids)
        tokens_per_word = 0.9 * tokens_per_word + 0.1 * tokens_per_word * length / budget  # calibrate as we go
        if length <= max_length:
            rows.append({"messages": messages})
    return rows


def build_model(args, tokenizer, directory: Path) -> int:
    """Build the Llama model from config with a fixed seed and save it with the tokenizer; returns #params."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.config import TinyModelConfig
    from posttrain.models.loading import tiny_llama_config

    model_cfg = TinyModelConfig(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        max_position_embeddings=max(1024, args.max_length),
    )
    config = tiny_llama_config(model_cfg, tokenizer)
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return sum(parameter.numel() for parameter in model.parameters())


def build_assets(args, workdir: Path) -> dict:
    """Write model, tokenizer and data to `workdir`; returns the spec every child reads."""
    from posttrain.data.batching import StepPlan

    started = time.perf_counter()
    sampler = WordSampler(random.Random(SEED), args.lexicon_size)
    tokenizer = build_tokenizer(sampler, args.vocab_size, args.corpus_words)
    total_steps = args.warmup + args.steps
    rows = build_conversations(sampler, tokenizer, total_steps * args.batch_size, args.max_length)
    data_file = workdir / "train.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model_dir = workdir / "model"
    num_parameters = build_model(args, tokenizer, model_dir)
    plan = StepPlan(args.batch_size, 1, 1, len(rows), SEED)
    order = [index for step in range(total_steps) for index in plan.step_indices(step)]
    return {
        "model_dir": str(model_dir),
        "data_file": str(data_file),
        "order": order,  # row indices in posttrain's step order: TRL reads the rows in this order
        "total_steps": total_steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": args.threads,
        "workdir": str(workdir),
        "num_parameters": num_parameters,
        "vocab_size": len(tokenizer),
        "setup_seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------------
# Children: one side per process
# ---------------------------------------------------------------------------------------------------------------


def prepare_child(threads: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    torch.set_num_threads(threads)


def compose_posttrain_config(overrides: list[str]):
    """The config the `posttrain` CLI would compose for `overrides` (as tests/conftest.py does)."""
    from hydra import compose, initialize_config_dir

    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides)


def run_posttrain(spec: dict, side: dict, run_dir: Path) -> dict:
    """posttrain's SFT trainer through the trainer-core API (`start_run` + the registered class), its
    `train_step` called step by step as `posttrain.training.run_loop` does, timed at each step's end."""
    import torch

    from posttrain.trainers import get_algorithm
    from posttrain.training import start_run

    cfg = compose_posttrain_config(
        [
            f"model.path='{spec['model_dir']}'",
            f"model.fused_logprobs={str(side['fused']).lower()}",
            "data=jsonl",
            f"data.train_files=['{spec['data_file']}']",
            f"data.max_length={spec['max_length']}",
            f"data.packing={str(side['packing']).lower()}",
            f"train.micro_batch_size={spec['batch_size']}",
            "train.gradient_accumulation_steps=1",
            f"train.max_steps={spec['total_steps']}",
            f"optim.lr={LEARNING_RATE}",
            f"optim.warmup_ratio={WARMUP_RATIO}",
            "logger.progress_bar=false",
            "checkpoint.every=0",
            f"run_dir='{run_dir}'",
            f"seed={SEED}",
        ]
    )
    algorithm = get_algorithm("sft")
    trainer = algorithm.entry(start_run(cfg, algorithm))
    step_ends, cpu_ends, step_tokens, threads_seen, metrics = [], [], [], [], []
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(trainer.total_steps):
        metrics.append(trainer.train_step(step))
        step_ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())
        step_tokens.append(sum(len(trainer.train_examples[i].input_ids) for i in trainer.plan.step_indices(step)))
        threads_seen.append(torch.get_num_threads())
    return {
        "step_seconds": _differences(started, step_ends),
        "step_cpu_seconds": _differences(cpu_started, cpu_ends),
        "step_tokens": step_tokens,
        "step_target_tokens": [int(record["target_tokens"]) for record in metrics],
        "losses": [record["loss"] for record in metrics],
        "reported_tokens_per_second": [record["tokens_per_second"] for record in metrics],
        "threads": sorted(set(threads_seen)),
    }


def _differences(start: float, ends: list[float]) -> list[float]:
    return [end - previous for previous, end in zip([start, *ends[:-1]], ends)]


def load_trl_rows(spec: dict) -> list[dict]:
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines() if line.strip()]
    return [rows[index] for index in spec["order"]]


def tokenization_mismatches(dataset, rows: list[dict], tokenizer) -> int:
    """Rows where TRL's input_ids or assistant-only labels differ from posttrain's for the same conversation."""
    from posttrain.data.chat import tokenize_conversation

    mismatches = 0
    for prepared, row in zip(dataset, rows):
        ours = tokenize_conversation(tokenizer, row["messages"])
        mismatches += prepared["input_ids"] != ours.input_ids or prepared["labels"] != ours.labels
    return mismatches + abs(len(dataset) - len(rows))


def trl_config(spec: dict, side: dict, output_dir: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=spec["total_steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP_RATIO,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as posttrain (TRL's default here would be the fused variant)
        bf16=False,  # TRL defaults to bf16 autocast and gradient checkpointing; posttrain runs fp32 without
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        assistant_only_loss=True,
        padding_free=side["padding_free"],
        max_length=None if side["padding_free"] else spec["max_length"],  # padding_free rejects a max_length
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
    )


def run_trl(spec: dict, side: dict, output_dir: Path) -> dict:
    """TRL's SFTTrainer.train() with a callback that takes the time at each step end and the logged counters."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.started, self.cpu_started, self.ends, self.cpu_ends = 0.0, 0.0, [], []
            self.cumulative_tokens, self.losses, self.threads = [], [], set()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())
            self.threads.add(torch.get_num_threads())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.cumulative_tokens.append(int(logs["num_tokens"]))
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    rows = load_trl_rows(spec)
    recorder = StepRecorder()
    trainer = SFTTrainer(
        model=model,
        args=trl_config(spec, side, output_dir),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    mismatches = tokenization_mismatches(trainer.train_dataset, rows, tokenizer)
    trainer.train()
    return {
        "step_seconds": _differences(recorder.started, recorder.ends),
        "step_cpu_seconds": _differences(recorder.cpu_started, recorder.cpu_ends),
        "step_tokens": [b - a for a, b in zip([0, *recorder.cumulative_tokens[:-1]], recorder.cumulative_tokens)],
        "losses": recorder.losses,
        "tokenization_mismatches": mismatches,
        "threads": sorted(recorder.threads),
    }


def child_main(side_name: str, spec_path: Path, result_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    prepare_child(spec["threads"])
    side = SIDES[side_name]
    scratch = Path(tempfile.mkdtemp(prefix=f"{side_name}-", dir=spec["workdir"]))
    load_before = os.getloadavg()[0]
    runner = run_posttrain if side["framework"] == "posttrain" else run_trl
    result = runner(spec, side, scratch)
    result.update(side=side_name, load_average=[load_before, os.getloadavg()[0]])
    result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# Orchestration and report (parent process)
# ---------------------------------------------------------------------------------------------------------------


def run_side(side: str, spec_path: Path, workdir: Path, round_index: int) -> dict:
    result_path = workdir / f"result-{side}-{round_index}.json"
    log_path = workdir / f"log-{side}-{round_index}.txt"
    env = {**os.environ, "OMP_NUM_THREADS": str(json.loads(spec_path.read_text())["threads"])}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--child", side, "--spec", str(spec_path), "--result", str(result_path)]
    with log_path.open("w") as log:
        completed = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0:
        tail = log_path.read_text()[-4000:]
        return {"side": side, "error": f"exit status {completed.returncode}; log tail:\n{tail}"}
    return json.loads(result_path.read_text())


def timed_cost(result: dict, warmup: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the timed steps: the same tokens on every side, so their ratio is the speed-up."""
    return sum(result["step_seconds"][warmup:]), sum(result["step_cpu_seconds"][warmup:])


def summarise_run(result: dict, warmup: int) -> dict:
    """Throughput over the timed (post-warm-up) steps of one child run, by wall clock and by process CPU time."""
    seconds, cpu_seconds = result["step_seconds"][warmup:], result["step_cpu_seconds"][warmup:]
    tokens = result["step_tokens"][warmup:]
    if not seconds or len(seconds) != len(tokens):
        raise RuntimeError(f"{result['side']}: {len(seconds)} timed steps but {len(tokens)} token counts")
    return {
        "steps": len(seconds),
        "tokens_per_second": sum(tokens) / sum(seconds),
        "seconds_per_step": sum(seconds) / len(seconds),
        "tokens_per_cpu_second": sum(tokens) / sum(cpu_seconds),
        "cpu_seconds_per_step": sum(cpu_seconds) / len(cpu_seconds),
        "tokens_per_step": sum(tokens) / len(tokens),
    }


RATE_METRICS = ("tokens_per_second", "tokens_per_cpu_second")


def summarise(rounds: list[dict[str, dict]], sides: list[str], warmup: int) -> dict:
    """Per side: medians over rounds; per baseline and rate metric: the median of the per-round ratios."""
    per_round = [
        {side: summarise_run(result, warmup) for side, result in round_.items() if "error" not in result}
        for round_ in rounds
    ]
    summary = {}
    for side in sides:
        runs = [round_[side] for round_ in per_round if side in round_]
        if not runs:
            summary[side] = {"error": rounds[-1][side]["error"]}
            continue
        summary[side] = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "steps"}
        summary[side]["steps"] = sum(run["steps"] for run in runs)
        summary[side]["per_round_tokens_per_second"] = [run["tokens_per_second"] for run in runs]
        for baseline in BASELINES:
            for metric in RATE_METRICS:
                ratios = [
                    round_[side][metric] / round_[baseline][metric]
                    for round_ in per_round
                    if side in round_ and baseline in round_
                ]
                if ratios:
                    summary[side][f"{metric}_ratio_vs_{baseline}"] = statistics.median(ratios)
                    summary[side][f"{metric}_per_round_ratios_vs_{baseline}"] = ratios
    return summary


def consistency_notes(rounds: list[dict[str, dict]]) -> list[str]:
    """Checks that the sides did the same work: tokens per step, TRL's tokenization, losses, threads."""
    notes, reference_tokens, losses = [], None, {}
    for round_ in rounds:
        for side, result in round_.items():
            if "error" in result:
                continue
            if reference_tokens is None:
                reference_tokens = result["step_tokens"]
            if result["step_tokens"] != reference_tokens:
                notes.append(f"WARNING {side}: tokens per step differ from the other sides (different batches)")
            if result.get("tokenization_mismatches"):
                notes.append(
                    f"WARNING {side}: {result['tokenization_mismatches']} rows tokenized differently from posttrain"
                )
            if result["losses"]:
                losses.setdefault(side, result["losses"])
            if len(result["threads"]) != 1:
                notes.append(f"WARNING {side}: torch thread count changed during the run: {result['threads']}")
    if losses:
        reference_side, reference = next(iter(losses.items()))
        deviations = {side: max(abs(a - b) for a, b in zip(values, reference)) for side, values in losses.items()}
        notes.append(
            f"loss at step 1 / step {len(reference)} (same weights, batches and lr schedule): "
            + ", ".join(f"{side} {values[0]:.4f} / {values[-1]:.4f}" for side, values in losses.items())
            + f"; largest per-step difference from {reference_side}: "
            + ", ".join(f"{side} {deviation:.1e}" for side, deviation in deviations.items() if side != reference_side)
        )
    return notes


def print_table(summary: dict, sides: list[str]) -> None:
    def ratio(row: dict, metric: str, baseline: str) -> str:
        key = f"{metric}_ratio_vs_{baseline}"
        return f"{row[key]:.2f}x" if key in row else "-"

    header = (
        f"{'side':<18} {'steps':>5} {'tokens/s':>9} {'s/step':>8} {'vs trl':>7} {'vs trl-pf':>9} | "
        f"{'tok/cpu-s':>9} {'cpu-s/step':>10} {'vs trl':>7} {'vs trl-pf':>9}"
    )
    print(header)
    print("-" * len(header))
    for side in sides:
        row = summary[side]
        if "error" in row:
            print(f"{side:<18} failed: {row['error'].splitlines()[0]}")
            continue
        print(
            f"{side:<18} {row['steps']:>5} {row['tokens_per_second']:>9.1f} {row['seconds_per_step']:>8.2f} "
            f"{ratio(row, 'tokens_per_second', 'trl'):>7} {ratio(row, 'tokens_per_second', 'trl-padding-free'):>9} | "
            f"{row['tokens_per_cpu_second']:>9.1f} {row['cpu_seconds_per_step']:>10.2f} "
            f"{ratio(row, 'tokens_per_cpu_second', 'trl'):>7} "
            f"{ratio(row, 'tokens_per_cpu_second', 'trl-padding-free'):>9}"
        )
    print(
        "tokens = non-pad input tokens (prompt + response); tokens/s by wall clock (the headline), tok/cpu-s by the "
        "child's process CPU time (all threads; less sensitive to other load); medians over rounds, ratios are "
        "medians of per-round ratios; trl-pf = trl-padding-free"
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds: every side once per round, order rotated"
    )
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {', '.join(SIDES)}")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=1536)
    parser.add_argument(
        "--vocab-size", type=int, default=32000, help="BPE tokenizer size (model vocab rounds up to x64)"
    )
    parser.add_argument("--max-length", type=int, default=512, help="longest conversation in tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (accumulation 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every side")
    parser.add_argument("--lexicon-size", type=int, default=60000, help="distinct pseudo-words in the data")
    parser.add_argument("--corpus-words", type=int, default=1_000_000, help="words of tokenizer training text")
    parser.add_argument("--workdir", type=Path, help="keep model, data and child logs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model and data, posttrain vs trl, 1 thread, < 60 s idle"
    )
    parser.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.rounds, args.sides, args.threads = 2, 1, 2, "posttrain,trl", 1
        args.hidden_size, args.layers, args.heads, args.intermediate_size = 128, 2, 4, 256
        args.vocab_size, args.max_length, args.lexicon_size, args.corpus_words = 1024, 128, 2000, 50_000
    unknown = [side for side in args.sides.split(",") if side not in SIDES]
    if unknown:
        parser.error(f"unknown side(s) {unknown}; known: {', '.join(SIDES)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec, args.result)
        return
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        spec = build_assets(args, workdir)
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        print(
            f"model: {spec['num_parameters'] / 1e6:.1f}M parameters (hidden {args.hidden_size}, {args.layers} layers, "
            f"vocab {spec['vocab_size']}), {args.batch_size} conversations/step of <= {args.max_length} tokens, "
            f"{args.threads} threads, fp32; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        protocol_rounds = run_rounds(
            sides, args.rounds, lambda side, round_index: run_side(side, spec_path, workdir, round_index)
        )
    rounds = [round_["results"] for round_ in protocol_rounds]
    comparisons = compare(
        protocol_rounds, partial(timed_cost, warmup=args.warmup), "posttrain", [b for b in BASELINES if b in sides]
    )
    summary = summarise(rounds, sides, args.warmup)
    print()
    print_table(summary, sides)
    for note in consistency_notes(rounds):
        print(note)
    for side in sides:
        if "error" in summary[side]:
            print(f"\n{side} failed:\n{summary[side]['error']}")
    print()
    print(format_comparisons("sft_throughput", comparisons, protocol_rounds))
    if args.out:
        settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        spec.pop("order")
        write_results(
            args.out,
            {
                "protocol": protocol_summary("sft_throughput", comparisons, protocol_rounds),
                "settings": settings,
                "spec": spec,
                "summary": summary,
                "rounds": protocol_rounds,
            },
        )


if __name__ == "__main__":
    main()
