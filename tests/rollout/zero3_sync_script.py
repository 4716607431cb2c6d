"""Run by test_zero3_sync.py as `torchrun --nproc_per_node=2 zero3_sync_script.py OUT_DIR` (CPU, gloo).

Each rank trains the tiny policy with DeepSpeed ZeRO-3 (so it holds only a shard of every weight),
owns a vLLM engine (vLLM's external_launcher executor inside the torchrun world), and checks its
share of the prompts against transformers on the gathered weights, before and after
`RolloutService.sync_weights(engine)`. Phase "zero3" fine-tunes every weight; phase "lora" trains
LoRA adapters under ZeRO-3 and syncs the merged weights into the same engines.
Writes OUT_DIR/rank{r}.json.
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]  # repo, tests/

import torch  # noqa: E402
from rollout_helpers import recomputed_logprobs, reference_greedy  # noqa: E402

from posttrain.data.batching import collate  # noqa: E402
from posttrain.data.chat import IGNORE_INDEX, render_ids, tokenize_conversation  # noqa: E402
from posttrain.engine.backend import build_engine  # noqa: E402
from posttrain.engine.distributed import close_distributed, init_distributed, rank, world_size  # noqa: E402
from posttrain.engine.export import export_hf, hf_state_dict  # noqa: E402
from posttrain.models.loading import load_model  # noqa: E402
from posttrain.models.logprob_model import CausalLMWithLogprobs  # noqa: E402
from posttrain.models.lora import wrap_lora  # noqa: E402
from posttrain.models.tokenizer import train_tokenizer  # noqa: E402
from posttrain.rollout import RolloutConfig, SamplingConfig, build_rollout_service  # noqa: E402

MAX_TOKENS = 24
STEPS = 12
MICRO_BATCH = 8


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return hydra_compose("config", overrides=overrides)


def deepspeed_engine(cfg, model):
    module = CausalLMWithLogprobs(model, fused=False, zero_stage=cfg.deepspeed.zero_stage)
    return build_engine(module, cfg, total_steps=STEPS)


def train(engine, examples) -> None:
    """STEPS ZeRO-3 steps; each rank takes its own MICRO_BATCH examples per step."""
    for step in range(STEPS):
        start = ((step * world_size() + rank()) * MICRO_BATCH) % len(examples)
        batch = collate((examples + examples)[start : start + MICRO_BATCH], packing=True, pad_token_id=0)
        targets = batch.pop("targets")
        logprobs, _ = engine(targets=targets, **batch)
        mask = targets != IGNORE_INDEX
        engine.backward(-(logprobs * mask).sum() / mask.sum(), scale_wrt_gas=False)
        engine.step()


def gathered_reference(engine, cfg, tokenizer):
    """A plain transformers copy of the engine's policy with the full (gathered, LoRA-merged) weights."""
    state = hf_state_dict(engine.module.policy, zero_stage=3, all_ranks=True)  # a collective
    reference = load_model(cfg.model, tokenizer, seed=0)
    reference.load_state_dict(state)
    return reference.eval()


def compare(service, reference, prompts, tokenizer) -> dict:
    ids = [render_ids(tokenizer, prompt, add_generation_prompt=True) for prompt in prompts]
    expected = reference_greedy(reference, ids, MAX_TOKENS, tokenizer.eos_token_id)
    completions = service.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS))
    gaps = [
        (torch.tensor(c.logprobs) - recomputed_logprobs(reference, c.prompt_token_ids, c.token_ids)).abs().max().item()
        for c in completions
    ]
    return {"equal": [c.token_ids == e for c, e in zip(completions, expected)], "max_logprob_gap": max(gaps)}


def train_sync_compare(service, engine, cfg, examples, prompts, tokenizer) -> dict:
    train(engine, examples)
    reference = gathered_reference(engine, cfg, tokenizer)
    before = compare(service, reference, prompts, tokenizer)
    started = time.perf_counter()
    service.sync_weights(engine)  # a collective: ZeRO-3 gathers one parameter at a time
    sync_seconds = time.perf_counter() - started
    after = compare(service, reference, prompts, tokenizer)
    return {"before": before, "after": after, "sync_seconds": sync_seconds}


def main(out_dir: Path) -> None:
    init_distributed()
    from data_recipes import generate_task

    rows = generate_task("arithmetic", "train", 256, seed=0)
    tokenizer = train_tokenizer([m["content"] for row in rows for m in row["messages"]], vocab_size=512)
    examples = [tokenize_conversation(tokenizer, row["messages"]) for row in rows]
    prompts = [row["prompt"] for row in generate_task("arithmetic", "eval", 6, seed=1)][rank() :: world_size()]
    common = [f"run_dir={out_dir}", "optim.warmup_ratio=0", f"train.micro_batch_size={MICRO_BATCH}", "deepspeed=zero3"]
    results = {}

    cfg = compose([*common, "optim.lr=5e-3"])
    engine = deepspeed_engine(cfg, load_model(cfg.model, tokenizer, seed=0))
    export_hf(engine.module.policy, tokenizer, out_dir / "rollout_init", zero_stage=3)  # the initial policy
    service = build_rollout_service(
        RolloutConfig(max_model_len=256, kv_cache_gib=0.25, max_num_seqs=16), out_dir / "rollout_init", tokenizer
    )
    results["zero3"] = train_sync_compare(service, engine, cfg, examples, prompts, tokenizer)

    lora_cfg = compose([*common, "optim.lr=2e-2", "peft=lora"])
    lora_engine = deepspeed_engine(lora_cfg, wrap_lora(load_model(lora_cfg.model, tokenizer, seed=0), lora_cfg.peft))
    service.sync_weights(lora_engine)  # adapters start at zero: the engines hold the base weights again
    results["lora"] = train_sync_compare(service, lora_engine, lora_cfg, examples, prompts, tokenizer)

    (out_dir / f"rank{rank()}.json").write_text(json.dumps(results, indent=1))
    close_distributed()  # both ranks leave together; gloo's teardown at exit could abort (SIGABRT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
