"""Run by test_zero3_chunked_sync.py as `torchrun --nproc_per_node=2 zero3_chunks_script.py OUT_DIR` (CPU, gloo).

A tiny policy (and a LoRA copy of it with random adapters) partitioned by DeepSpeed ZeRO-3 streams its weights with
a bucket far smaller than its tensors, so every large parameter is assembled from the ranks' flat partitions
chunk by chunk (`assembled_from_partitions`, an odd chunk size so chunks straddle nothing evenly). Every rank
writes OUT_DIR/rank{r}.json: per name, whether the tensor equals the unpartitioned model's exactly.
"""

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]  # repo, tests/

import deepspeed  # noqa: E402
import torch  # noqa: E402
from rollout_helpers import tiny_policy  # noqa: E402

from posttrain.config import PeftConfig  # noqa: E402
from posttrain.engine.distributed import close_distributed, init_distributed, rank  # noqa: E402
from posttrain.models.lora import wrap_lora  # noqa: E402
from posttrain.models.tokenizer import train_tokenizer  # noqa: E402
from posttrain.rollout import weights  # noqa: E402

BUCKET_BYTES = 3 * 1000 + 4  # smaller than every matrix: each is assembled in chunks of 250 float32 per rank
CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}  # fmt: skip


def compare(model: torch.nn.Module, reference: torch.nn.Module, assembled: list) -> dict:
    """Stream `model` (partitioned) and `reference` (whole) and compare the tensors name by name."""
    expected = dict(weights.policy_weights(reference, BUCKET_BYTES))
    streamed = list(weights.policy_weights(model, BUCKET_BYTES))
    return {
        "names_equal": [name for name, _ in streamed] == list(expected),
        "equal": {name: bool(torch.equal(tensor, expected[name])) for name, tensor in streamed},
        "assembled": len(assembled),
    }


def main(out_dir: Path) -> None:
    init_distributed()
    tokenizer = train_tokenizer(["What is 12 + 35? The answer is 47."] * 16, vocab_size=300)
    assembled: list[int] = []  # numel of each parameter built from partitions
    original = weights.assembled_from_partitions

    def counting(param, chunk_bytes):
        assembled.append(param.ds_numel)
        return original(param, chunk_bytes)

    weights.assembled_from_partitions = counting
    results = {}
    for case in ("full", "lora"):
        model = tiny_policy(tokenizer, seed=0)
        if case == "lora":
            model = wrap_lora(model, PeftConfig(enabled=True, r=4, alpha=8))
            with torch.no_grad():  # the same adapters on both ranks (ZeRO-3 keeps rank 0's), B non-zero
                for index, (name, parameter) in enumerate(model.named_parameters()):
                    if "lora_" in name:
                        parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(index))
        for parameter in model.parameters():  # ZeRO-3 partitions rank 0's values: the reference must be those
            torch.distributed.broadcast(parameter.data, 0)
        reference = copy.deepcopy(model)
        engine, *_ = deepspeed.initialize(model=model, config=CONFIG)
        assembled.clear()
        results[case] = compare(engine, reference, assembled)
    (out_dir / f"rank{rank()}.json").write_text(json.dumps(results))
    close_distributed()  # both ranks leave together; gloo's teardown at exit could abort (SIGABRT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
