"""Run by test_reference_refresh.py as `torchrun --nproc_per_node=2 reference_refresh_script.py OUT_DIR` (CPU, gloo).

For ZeRO-2 and ZeRO-3: the tiny policy takes two optimizer steps in a DeepSpeed engine (under ZeRO-3 each rank
holds a shard of every weight), a frozen reference is built from the same starting weights (`frozen_model`: under
ZeRO-3 partitioned by an optimizer-free engine), then `refresh_reference` copies the policy into it. Each rank
gathers both models whole and records the largest weight difference before and after the refresh; then the
refreshed reference is written as a checkpoint would hold it (`save_reference_weights`), a fresh reference is
restored from it (`restore_reference_weights`) and compared too. Writes OUT_DIR/rank{r}.json.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]  # repo, tests/

import torch  # noqa: E402
from helpers import compose_config  # noqa: E402

from posttrain.data.batching import collate  # noqa: E402
from posttrain.data.chat import IGNORE_INDEX, tokenize_conversation  # noqa: E402
from posttrain.engine.backend import build_engine, zero3_load_config  # noqa: E402
from posttrain.engine.distributed import barrier, close_distributed, init_distributed, rank  # noqa: E402
from posttrain.engine.export import hf_state_dict  # noqa: E402
from posttrain.engine.reference import frozen_model  # noqa: E402
from posttrain.models.loading import load_model  # noqa: E402
from posttrain.models.logprob_model import CausalLMWithLogprobs  # noqa: E402
from posttrain.models.reference import (  # noqa: E402
    REFERENCE_WEIGHTS,
    refresh_reference,
    restore_reference_weights,
    save_reference_weights,
)
from posttrain.models.tokenizer import train_tokenizer  # noqa: E402


def whole_weights(module, zero_stage: int) -> dict[str, torch.Tensor]:
    return hf_state_dict(module, zero_stage, all_ranks=True)  # a collective


def largest_difference(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> float:
    assert one.keys() == two.keys()
    return max(float((one[name] - two[name]).abs().max()) for name in one)


def frozen_reference(cfg, tokenizer):
    model = load_model(cfg.model, tokenizer, seed=0, ds_config=zero3_load_config(cfg))
    module = CausalLMWithLogprobs(model, fused=False, zero_stage=cfg.deepspeed.zero_stage)
    return frozen_model(module, cfg.deepspeed.zero_stage, cfg.model.dtype)


def reference_policy(reference):
    return (reference.module if hasattr(reference, "module") else reference).policy


def run_stage(zero_stage: int, tokenizer, examples, out_dir: Path) -> dict:
    cfg = compose_config([f"deepspeed=zero{zero_stage}", "optim.lr=1e-2", "optim.warmup_ratio=0"])
    model = load_model(cfg.model, tokenizer, seed=0, ds_config=zero3_load_config(cfg))
    engine = build_engine(CausalLMWithLogprobs(model, fused=False, zero_stage=zero_stage), cfg, total_steps=2)
    for step in range(2):
        batch = collate(examples[4 * step + 2 * rank() :][:2], packing=True, pad_token_id=0)
        targets = batch.pop("targets")
        logprobs, _ = engine(targets=targets, **batch)
        mask = targets != IGNORE_INDEX
        engine.backward(-(logprobs * mask).sum() / mask.sum(), scale_wrt_gas=False)
        engine.step()
    reference = frozen_reference(cfg, tokenizer)
    policy = whole_weights(engine.module.policy, zero_stage)
    before = largest_difference(whole_weights(reference_policy(reference), zero_stage), policy)
    refresh_reference(reference, engine.module.policy, zero_stage)
    after = largest_difference(whole_weights(reference_policy(reference), zero_stage), policy)
    checkpoint = out_dir / f"zero{zero_stage}"
    if rank() == 0:
        checkpoint.mkdir()
    barrier()
    save_reference_weights(reference, checkpoint, zero_stage)
    barrier()
    restored = frozen_reference(cfg, tokenizer)
    restored_before = largest_difference(whole_weights(reference_policy(restored), zero_stage), policy)
    found = restore_reference_weights(restored, checkpoint, zero_stage)
    restored_after = largest_difference(whole_weights(reference_policy(restored), zero_stage), policy)
    # Elements this rank stores: its partition (ds_tensor) under ZeRO-3, else the whole parameter.
    local = sum(getattr(p, "ds_tensor", p).numel() for p in reference_policy(reference).parameters())
    return {
        "before": before,
        "after": after,
        "restored_before": restored_before,
        "restored_found": found,
        "restored_after": restored_after,
        "checkpoint_files": sorted(path.name for path in checkpoint.iterdir()),
        "reference_local_numel": local,
        "policy_numel": sum(tensor.numel() for tensor in policy.values()),
    }


def main(out_dir: Path) -> None:
    init_distributed()
    from data_recipes import generate_task

    rows = generate_task("arithmetic", "train", 64, seed=0)
    tokenizer = train_tokenizer([m["content"] for row in rows for m in row["messages"]], vocab_size=512)
    examples = [tokenize_conversation(tokenizer, row["messages"]) for row in rows]
    results = {f"zero{stage}": run_stage(stage, tokenizer, examples, out_dir) for stage in (2, 3)}
    (out_dir / f"rank{rank()}.json").write_text(json.dumps(results))
    assert REFERENCE_WEIGHTS in results["zero3"]["checkpoint_files"]
    close_distributed()  # both ranks leave together; gloo's teardown at exit could abort (SIGABRT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
