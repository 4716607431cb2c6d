"""Where a trainer's optimizer step spends its time: torch.profiler over a few steps, grouped by kind of work.

    python benchmarks/profile_step.py --algo dpo                          # 16 pairs of ~130 tokens
    python benchmarks/profile_step.py --algo dpo --tokens 128 512         # 16 pairs of 128-512-token responses
    python benchmarks/profile_step.py --algo sft --tokens 256 512         # 8 conversations of 256-512 tokens
    python benchmarks/profile_step.py --algo rlvr                         # 8 prompts x 8 samples, hf rollout
    python benchmarks/profile_step.py --algo dpo --packed-rows layout     # the packed row laid out as padded rows
    python benchmarks/profile_step.py --algo dpo --packed-rows mask       # the packed row as one N x N-masked row
    python benchmarks/profile_step.py --algo sft --override model.fused_cross_entropy=false  # any Hydra override

The model is the benchmark Llama (--hidden 512, --layers 8, --vocab 8192, fp32, random weights, seed 0) with a
BPE tokenizer trained on the arithmetic task; data: the arithmetic task's pairs / conversations / prompts, or with
--tokens MIN MAX responses of MIN-MAX tokens (sums written out, so every token is text the tokenizer knows). Each
trainer runs through the trainer-core API (`start_run` + the registered class) in this process; after --warmup
unprofiled steps, --steps steps run under torch.profiler (CPU activities). Printed: the median step time, the
step's tokens, and self CPU time per kind of work -- GEMMs (mm/addmm/bmm), attention (the sdpa kernels), the
fused log-prob head (posttrain::*), the optimizer step (ops inside torch's `Optimizer.step`), everything else
(element-wise ops, norms, copies, Python) -- then the --top ops. `--packed-rows` picks how sdpa runs a packed
row (`posttrain.models.attention`): `split` (the default, `PACKED_SDPA`: attention per sequence, the rest on the
packed row), `layout` (the whole decoder on rows of the longest sequence, `row_layout`: the previous default),
`mask` (one row attended through an N x N block mask: before both). Shares are valid under load;
absolute times are not (run it on a quiet machine and record `uptime`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("gemm", "attention", "fused head", "optimizer", "other")


def sums_text(rng: random.Random, tokenizer, tokens: int) -> str:
    """Sentences 'a + b = c.' until the text is at least `tokens` tokens long."""
    out: list[str] = []
    while True:
        a, b = rng.randint(10**5, 10**8), rng.randint(10**5, 10**8)
        out.append(f"{a} + {b} = {a + b}.")
        text = " ".join(out)
        if len(tokenizer(text)["input_ids"]) >= tokens:
            return text


def prepare(workdir: Path, args) -> list[str]:
    """Model directory, data file; returns the algorithm's Hydra overrides."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from common import arithmetic_tokenizer

    tokenizer = arithmetic_tokenizer()
    if args.algo == "rlvr":  # sampled ids must decode: the vocabulary is the tokenizer's (as in rlvr_vs_trl.py)
        args.vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    common = [f"model.path={workdir / 'model'}", "model.dtype=float32", "model.gradient_checkpointing=false",
              "logger.progress_bar=false", "optim.warmup_ratio=0", f"run_dir={workdir / 'run'}",
              f"train.max_steps={args.warmup + args.steps + 1}"]  # fmt: skip
    rng = random.Random(0)
    rows = args.batch * (args.warmup + args.steps + 2)
    if args.algo == "rlvr":
        return ["algo=rlvr", f"rollout={args.rollout}", f"algo.prompts_per_step={args.batch}", "algo.sampling.n=8",
                "algo.sampling.max_tokens=128", "algo.dynamic_sampling=off", "eval.max_tokens=8",
                "data.num_eval=1", *common]  # fmt: skip
    data = workdir / "data.jsonl"
    with data.open("w") as handle:
        for _ in range(rows):
            if args.tokens:
                low, high = args.tokens
                prompt = sums_text(rng, tokenizer, rng.randint(20, 60))
                answers = [sums_text(rng, tokenizer, rng.randint(low, high)) for _ in range(2)]
            else:
                a, b = rng.randint(10**7, 10**8), rng.randint(10**7, 10**8)
                prompt, answers = f"What is {a} + {b}?", [f"{a} + {b} = {a + b}", f"{a} + {b} = {a + b + 1}"]
            user = [{"role": "user", "content": prompt}]
            if args.algo == "dpo":
                row = {"prompt": user, "chosen": [{"role": "assistant", "content": answers[0]}],
                       "rejected": [{"role": "assistant", "content": answers[1]}]}  # fmt: skip
            else:
                row = {"messages": [*user, {"role": "assistant", "content": answers[0]}]}
            handle.write(json.dumps(row) + "\n")
    overrides = [f"algo={args.algo}", "data=jsonl", f"data.train_files=[{data}]", "data.max_length=2048", *common,
                 f"train.micro_batch_size={args.batch}", "train.eval_every=0"]  # fmt: skip
    if args.algo == "dpo":
        overrides.append(f"algo.reference.cache_dir={workdir / 'cache'}")
    return overrides


def kind_of(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"):
        return "gemm"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name.startswith("posttrain::"):
        return "fused head"
    return "other"


def breakdown(profiler) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Self CPU seconds per kind (optimizer: the whole of `Optimizer.step`, removed from the other kinds) and the
    top ops by self CPU time. Self times do not overlap, so the kinds add up to the profiled CPU time."""
    events = profiler.events()
    kinds = dict.fromkeys(KINDS, 0.0)
    optimizer_ids = set()
    for event in events:
        if event.name.startswith("Optimizer.step"):
            kinds["optimizer"] += event.cpu_time_total / 1e6
            stack = list(event.cpu_children)
            while stack:
                child = stack.pop()
                optimizer_ids.add(child.id)
                stack += child.cpu_children
    ops: dict[str, list] = {}
    for event in events:
        if event.id in optimizer_ids or event.name.startswith("Optimizer.step"):
            continue
        seconds = event.self_cpu_time_total / 1e6
        kinds[kind_of(event.name)] += seconds
        entry = ops.setdefault(event.name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
    top = sorted(((name, s, n) for name, (s, n) in ops.items()), key=lambda item: -item[1])
    return kinds, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", choices=("sft", "dpo", "rlvr"), required=True)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192, help="sft / dpo (rlvr: the tokenizer's)")
    parser.add_argument("--batch", type=int, default=None, help="pairs (dpo) / sequences (sft) / prompts (rlvr)")
    parser.add_argument("--tokens", type=int, nargs=2, metavar=("MIN", "MAX"), help="response lengths (sft, dpo)")
    parser.add_argument("--rollout", default="hf", choices=("hf", "vllm"), help="rlvr's rollout backend")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--packed-rows", choices=("split", "layout", "mask"), default="split", help="see above")
    parser.add_argument("--out", type=Path, help="write the breakdown as JSON here")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="an extra Hydra override (repeatable), e.g. "
        "model.fused_cross_entropy=false for SFT's per-token head instead of the loss-fused one",
    )
    args = parser.parse_args()
    args.batch = args.batch or {"dpo": 16, "sft": 8, "rlvr": 8}[args.algo]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from hydra import compose, initialize_config_dir
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO_ROOT))
    import posttrain.models.attention as attention
    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs
    from posttrain.trainers import get_algorithm
    from posttrain.training import start_run

    if args.packed_rows in ("layout", "mask"):
        attention.PACKED_MODEL_TYPES = ()  # models stay on sdpa: decoder_hidden_states lays rows out
    if args.packed_rows == "mask":
        attention.row_layout = lambda position_ids, hidden_size: None
    workdir = Path(tempfile.mkdtemp(prefix="profile_step-"))
    overrides = [*prepare(workdir, args), *args.override]
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    algorithm = get_algorithm(args.algo)
    trainer = algorithm.entry(start_run(cfg, algorithm))
    for step in range(args.warmup):
        trainer.train_step(step)
    times, tokens = [], []
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for step in range(args.warmup, args.warmup + args.steps):
            started = time.perf_counter()
            metrics = trainer.train_step(step)
            times.append(time.perf_counter() - started)
            tokens.append(metrics.get("tokens_per_second", float("nan")) * times[-1])
    kinds, top = breakdown(profiler)
    total = sum(kinds.values())
    print(f"# {args.algo}: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {args.batch}, "
          f"tokens {args.tokens or 'arithmetic'}, packed rows: {args.packed_rows}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")  # fmt: skip
    print(
        f"median step {statistics.median(times):.2f} s, ~{statistics.median(tokens):.0f} tokens/step; "
        f"profiled self CPU {total:.1f} s over {args.steps} steps"
    )
    print("| kind | self CPU s / step | share |\n|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {kinds[kind] / args.steps:.2f} | {kinds[kind] / total:.0%} |")
    print("| op | self CPU s / step | calls / step |\n|---|---|---|")
    for name, seconds, calls in top[: args.top]:
        print(f"| `{name[:60]}` | {seconds / args.steps:.2f} | {calls // args.steps} |")
    if args.out:
        record = {"args": vars(args), "step_seconds": times, "tokens": tokens, "kinds": kinds, "top": top[:50]}
        args.out.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
