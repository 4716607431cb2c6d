"""Rollout throughput on CPU: the vLLM backend against the transformers backend, plus weight-sync time.

    python benchmarks/rollout.py                              # vllm and hf, float32 and bfloat16, 3 rounds
    python benchmarks/rollout.py --dtypes float32 --rounds 2 --out rollout.json
    python benchmarks/rollout.py --smoke                      # tiny model, 8 prompts, float32, < 2 min

Set-up (built once per invocation in a temporary directory, then every side loads the same files):
- tokenizer: `train_tokenizer` on the arithmetic task's text (byte-level BPE; ~320 tokens, so the model's
  vocabulary is small and decoding is bound by the decoder layers, not the lm_head);
- model: a Llama built from config with a fixed seed and random weights, hidden 512, 8 layers, 8 heads of
  64 (head_dim >= 32 for vLLM's CPU attention), 8 KV heads, MLP 1536: ~25M parameters, saved in float32;
  a second copy from another seed is the "trained" weights the sync pushes;
- prompts: 64 held-out arithmetic questions rendered with the chat template (16-20 tokens each);
- sampling, identical on both sides: n=1, temperature 1.0, top_p 1.0, top_k off, max_tokens 256, seed =
  round number, and --stop-ids token ids (the first ones of the vocabulary after the special tokens)
  as stop tokens. Random weights give a near-uniform next-token distribution, so each step stops with
  probability ~ stop_ids / vocab: completion lengths are spread from a few tokens to the 256 cap as RL
  rollouts are (the lengths are reported). The two backends draw different random numbers, so their
  completions differ token by token but follow the same length distribution.

Sides, each in its own fresh subprocess (--threads torch threads; the rollout service as trainers use it):
- vllm: `rollout=vllm`, the in-process engine, enforce_eager (no torch.compile), prefix caching on,
  max_num_seqs 64, 1 GiB KV cache;
- hf:   `rollout=hf`, transformers generate on all 64 prompts in one left-padded batch (hf_batch_size 64).

Measured per side: engine start-up; one warm-up generate (16 tokens, excluded: vLLM's first call compiles
a sampler kernel); then --rounds timed `generate` calls: generated tokens (sum of completion lengths, EOS /
stop tokens included) / wall-clock seconds; then `sync_weights` of the second model, 3 times (the first
and the best are reported). The machine is shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL = dict(
    hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1536, prompts=64, max_tokens=256
)
SMOKE = dict(
    hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=384, prompts=8, max_tokens=64
)


def build_inputs(workdir: Path, size: dict, stop_ids: int) -> None:
    """Tokenizer, the two models, the prompts and the sampling config, written under `workdir`."""
    from common import arithmetic_tokenizer, save_tiny_llama

    from data_recipes import generate_task
    from posttrain.config import TinyModelConfig
    from posttrain.data.chat import render_ids
    from posttrain.models.tokenizer import SPECIAL_TOKENS

    tokenizer = arithmetic_tokenizer()
    tiny = TinyModelConfig(
        **{key: size[key] for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")}
    )
    for name, seed in (("policy", 0), ("trained", 1)):
        model = save_tiny_llama(workdir / name, tokenizer, size, seed)
    prompts = [
        render_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        for row in generate_task("arithmetic", "eval", size["prompts"], seed=1)
    ]
    first_plain = len(SPECIAL_TOKENS)
    sampling = dict(
        n=1,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_tokens=size["max_tokens"],
        stop_token_ids=list(range(first_plain, first_plain + stop_ids)),
    )
    (workdir / "prompts.json").write_text(json.dumps(prompts))
    (workdir / "sampling.json").write_text(json.dumps(sampling))
    parameters = sum(p.numel() for p in model.parameters())
    (workdir / "model.json").write_text(
        json.dumps({"parameters": parameters, "vocab_size": model.config.vocab_size, **tiny.__dict__})
    )


def run_side(backend: str, dtype: str, workdir: Path, rounds: int) -> dict:
    """One side's measurements (runs in its own subprocess)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rollout import RolloutConfig, SamplingConfig, build_rollout_service

    tokenizer = AutoTokenizer.from_pretrained(workdir / "policy")
    prompts = json.loads((workdir / "prompts.json").read_text())
    sampling = SamplingConfig(**json.loads((workdir / "sampling.json").read_text()))
    cfg = RolloutConfig(
        backend=backend, dtype=dtype, max_model_len=512, max_num_seqs=64, kv_cache_gib=1.0, hf_batch_size=64
    )
    started = time.perf_counter()
    service = build_rollout_service(cfg, workdir / "policy", tokenizer)
    start_seconds = time.perf_counter() - started
    started = time.perf_counter()
    service.generate(prompts, dataclasses.replace(sampling, max_tokens=16, seed=100))
    warmup_seconds = time.perf_counter() - started
    timed = []
    for round_index in range(rounds):
        started = time.perf_counter()
        completions = service.generate(prompts, dataclasses.replace(sampling, seed=round_index))
        seconds = time.perf_counter() - started
        lengths = sorted(len(c.token_ids) for c in completions)
        timed.append(
            {
                "seconds": seconds,
                "tokens": sum(lengths),
                "tokens_per_second": sum(lengths) / seconds,
                "length_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
                "stopped": sum(c.finish_reason == "stop" for c in completions),
            }
        )
    trained = AutoModelForCausalLM.from_pretrained(workdir / "trained", dtype=torch.float32)
    sync_seconds = []
    for _ in range(3):
        service.sync_weights(trained)
        sync_seconds.append(service.last_sync_seconds)
    return {
        "backend": backend,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "start_seconds": start_seconds,
        "warmup_seconds": warmup_seconds,
        "rounds": timed,
        "sync_seconds_first": sync_seconds[0],
        "sync_seconds_best": min(sync_seconds),
    }


def launch_side(backend: str, dtype: str, workdir: Path, rounds: int, threads: int) -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        OMP_NUM_THREADS=str(threads),
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    command = [sys.executable, __file__, "--side", backend, dtype, str(workdir), "--rounds", str(rounds)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{backend}/{dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(results: list[dict], model: dict) -> str:
    lines = [
        f"model: {model['parameters'] / 1e6:.1f}M parameters, hidden {model['hidden_size']}, "
        f"{model['num_layers']} layers, "
        f"vocab {model['vocab_size']}; load = 1-min load average when a side finished (2 cores; shared machine)",
        f"{'side':<18}{'tok/s (best)':>13}{'tok/s (all rounds)':>28}{'tokens/round':>14}{'len min/med/max':>17}"
        f"{'start s':>9}{'warm-up s':>10}{'sync s first/best':>19}{'load':>6}",
    ]
    best = {}
    for side in results:
        rates = [r["tokens_per_second"] for r in side["rounds"]]
        best[(side["backend"], side["dtype"])] = max(rates)
        lengths = "/".join(str(x) for x in side["rounds"][0]["length_min_median_max"])
        lines.append(
            f"{side['backend'] + ' ' + side['dtype']:<18}{max(rates):>13.0f}{', '.join(f'{r:.0f}' for r in rates):>28}"
            f"{side['rounds'][0]['tokens']:>14}{lengths:>17}{side['start_seconds']:>9.1f}{side['warmup_seconds']:>10.1f}"
            f"{side['sync_seconds_first']:>13.3f}/{side['sync_seconds_best']:.3f}{side['load_average']:>6.1f}"
        )
    for dtype in sorted({dtype for _, dtype in best}):
        if ("vllm", dtype) in best and ("hf", dtype) in best:
            lines.append(f"{dtype}: vllm / hf = {best[('vllm', dtype)] / best[('hf', dtype)]:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", nargs=3, metavar=("BACKEND", "DTYPE", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", default=["vllm", "hf"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--stop-ids", type=int, default=3, help="stop token ids (sets the spread of completion lengths)"
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.side:
        backend, dtype, workdir = args.side
        print(json.dumps(run_side(backend, dtype, Path(workdir), args.rounds)))
        return
    sys.path.insert(0, str(REPO_ROOT))
    size = SMOKE if args.smoke else FULL
    dtypes = ["float32"] if args.smoke else args.dtypes
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        workdir = Path(tmp)
        build_inputs(workdir, size, args.stop_ids)
        model = json.loads((workdir / "model.json").read_text())
        results = []
        for dtype in dtypes:
            for backend in args.backends:
                results.append(launch_side(backend, dtype, workdir, args.rounds, args.threads))
                print(summarise(results[-1:], model).splitlines()[-1], file=sys.stderr, flush=True)  # progress
    print(summarise(results, model))
    if args.out:
        args.out.write_text(json.dumps({"model": model, "results": results}, indent=1))


if __name__ == "__main__":
    main()
