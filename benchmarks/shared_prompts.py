"""RLVR's training forward + backward with each group's prompt put through the model once (`algo.share_prompts`)
against every completion carrying its own prompt, at the RLVR benchmark's shape and with longer prompts.

    python benchmarks/shared_prompts.py                          # prompts of 18, 128 and 384 tokens, 3 rounds
    python benchmarks/shared_prompts.py --prompt-lengths 18 --rounds 5
    python benchmarks/shared_prompts.py --smoke                  # tiny model, 1 round: the script runs

The work of one side is one RLVR optimizer step's forwards and backwards (no optimizer, no rollout): 8 prompts x 8
completions in 4 micro-batches of 2 whole groups, through `completion_logprobs` on the 27.6M-parameter Llama of
rlvr_vs_trl.py (hidden 512, 8 layers, vocabulary 320, float32, the fused log-prob head), loss sum(advantage x
log-prob) + 0 x entropy as the policy losses keep both in the graph. Completion lengths are drawn uniformly from
1-120 tokens (mean ~60, as random weights sample in rlvr_vs_trl.py); prompts are random tokens of the given length.
Both sides see the same micro-batches in the same process, so the rounds are in-process (the protocol's rounds,
sides' order rotated, medians over `--steps` timed steps after one warm-up per side and round), not subprocesses:
the two sides differ only in the code path, and one process keeps machine drift between them small.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from protocol import compare, format_comparisons, protocol_summary, run_rounds, write_results  # noqa: E402

FULL = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1536, vocab_size=320)
SMOKE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128, vocab_size=320)
SIDES = ("shared", "plain")


def build_model(size: dict, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models.attention import use_packed_sdpa
    from posttrain.models.logprob_model import CausalLMWithLogprobs

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=size["vocab_size"], hidden_size=size["hidden_size"], intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_layers"], num_attention_heads=size["num_heads"],
        num_key_value_heads=size["num_kv_heads"], max_position_embeddings=2048, attn_implementation="sdpa",
    )  # fmt: skip
    model = CausalLMWithLogprobs(use_packed_sdpa(LlamaForCausalLM(config)), fused=True)
    if not model.shares_prompts:
        raise SystemExit("the model does not attend through posttrain_packed_sdpa: nothing to compare")
    return model


def micro_batches(prompt_length: int, args, vocab: int, seed: int):
    """4 micro-batches of 2 groups x 8 completions: (examples, prompt lengths, advantages) each."""
    import torch

    from posttrain.data.chat import IGNORE_INDEX, TokenizedExample

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(args.prompts // args.groups_per_micro_batch):
        examples, prompts = [], []
        for _ in range(args.groups_per_micro_batch):
            prompt = torch.randint(1, vocab, (prompt_length,), generator=generator).tolist()
            for _ in range(args.samples):
                length = int(torch.randint(1, args.max_completion + 1, (1,), generator=generator))
                completion = torch.randint(1, vocab, (length,), generator=generator).tolist()
                examples.append(TokenizedExample(prompt + completion, [IGNORE_INDEX] * prompt_length + completion))
                prompts.append(prompt_length)
        advantages = torch.randn(len(examples), generator=generator)
        batches.append((examples, prompts, advantages))
    return batches


def one_step(model, batches, share: bool) -> None:
    from posttrain.models.logprobs import completion_logprobs

    for examples, prompts, advantages in batches:
        logprobs, entropy, mask = completion_logprobs(model, examples, prompts, 1.0, share)
        loss = -(advantages[:, None] * logprobs * mask).sum() / mask.sum() + 0.0 * (entropy * mask).sum()
        loss.backward()
    model.zero_grad(set_to_none=True)


def model_tokens(batches, share: bool) -> int:
    """Tokens through the decoder in one step: each prompt once per group when shared, once per completion if not."""
    total = 0
    for examples, prompts, _ in batches:
        if share:
            groups = {tuple(e.input_ids[:p]): p for e, p in zip(examples, prompts)}
            total += sum(groups.values()) + sum(len(e.input_ids) - p for e, p in zip(examples, prompts))
        else:
            total += sum(len(e.input_ids) for e in examples)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[18, 128, 384])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--groups-per-micro-batch", type=int, default=2)
    parser.add_argument("--max-completion", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side and round (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.prompt_lengths, args.rounds, args.steps, args.max_completion = [8], 1, 1, 16
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(args.threads)
    size = SMOKE if args.smoke else FULL
    model = build_model(size, seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model {parameters / 1e6:.1f}M parameters; {args.threads} threads; load average {os.getloadavg()[0]:.2f}")
    results = {}
    for prompt_length in args.prompt_lengths:
        batches = micro_batches(prompt_length, args, size["vocab_size"], seed=prompt_length)

        def run_side(side: str, round_index: int, batches=batches) -> dict:
            share = side == "shared"
            one_step(model, batches, share)  # warm-up
            walls, cpus = [], []
            for _ in range(args.steps):
                wall, cpu = time.perf_counter(), time.process_time()
                one_step(model, batches, share)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "steps": walls}

        label = f"P={prompt_length}"
        rounds = run_rounds(list(SIDES), args.rounds, run_side, log=lambda line, label=label: print(f"{label}: {line}"))
        comparisons = compare(rounds, lambda r: (r["wall"], r["cpu"]), ours="shared", peers=["plain"])
        tokens = {side: model_tokens(batches, side == "shared") for side in SIDES}
        walls = {side: statistics.median(r["results"][side]["wall"] for r in rounds) for side in SIDES}
        print(format_comparisons(f"shared P={prompt_length}", comparisons, rounds))
        print(
            f"{label}: tokens through the model per step {tokens['plain']} -> {tokens['shared']} "
            f"({tokens['shared'] / tokens['plain']:.2f}); seconds per step {walls['plain']:.2f} -> "
            f"{walls['shared']:.2f}"
        )
        results[str(prompt_length)] = {
            "rounds": rounds, "comparisons": comparisons, "tokens": tokens, "median_seconds": walls,
            "protocol": protocol_summary(f"shared_prompts_P{prompt_length}", comparisons, rounds),
        }  # fmt: skip
    if args.out:
        settings = {key: value for key, value in vars(args).items() if key != "out"}
        write_results(args.out, {"settings": settings, "model": size, "parameters": parameters, "results": results})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
