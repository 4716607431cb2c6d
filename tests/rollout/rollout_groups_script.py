"""Run by test_rollout_groups.py as `torchrun --nproc_per_node=2 rollout_groups_script.py OUT_DIR` (CPU, gloo).

Both ranks own different prompts (3 and 2). Three services on the `hf` backend answer them greedily: one
rollout group of 2 ranks (tensor_parallel_size=2: the group gathers both ranks' prompts, both ranks generate
for all five, each keeps its own), 2 groups of 1 (tensor_parallel_size=1), and a plain single-engine service
with no group. Before and after a weight sync (other weights) every rank writes its completions to
OUT_DIR/rank{r}.json: the grouped services must return exactly what the single engine returns.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]  # repo, tests/

import torch.distributed as dist  # noqa: E402
from rollout_helpers import save_policy_dir, tiny_policy  # noqa: E402

from posttrain.engine.distributed import barrier, close_distributed, init_distributed, rank  # noqa: E402
from posttrain.models.tokenizer import train_tokenizer  # noqa: E402
from posttrain.rollout import RolloutConfig, SamplingConfig, build_rollout_service  # noqa: E402
from posttrain.rollout.service import RolloutService  # noqa: E402

PROMPTS = ["What is 12 + 35?", "Add 7 and 48.", "Compute 203 + 119.", "What is 5 + 5?", "Sum 64 and 36."]
GREEDY = SamplingConfig(temperature=0.0, max_tokens=12)


def main(out_dir: Path) -> None:
    init_distributed()
    tokenizer = train_tokenizer([*PROMPTS, "The answer is 0123456789."] * 8, vocab_size=300)
    model_dir = out_dir / "policy"
    if rank() == 0:
        save_policy_dir(tiny_policy(tokenizer, seed=0), tokenizer, model_dir)
    barrier()
    mine = [[{"role": "user", "content": text}] for text in (PROMPTS[:3] if rank() == 0 else PROMPTS[3:])]
    services = {
        "group_of_2": build_rollout_service(RolloutConfig(backend="hf", tensor_parallel_size=2), model_dir, tokenizer),
        "groups_of_1": build_rollout_service(RolloutConfig(backend="hf"), model_dir, tokenizer),
    }
    grouped = services["group_of_2"]
    single = RolloutService(grouped.backend, tokenizer, grouped.cfg)  # the same engine, no group
    results = {
        "group_ranks": grouped.group.ranks if grouped.group else None,
        "groups_of_1": services["groups_of_1"].group,
    }
    other = tiny_policy(tokenizer, seed=1)
    for phase in ("before", "after"):
        if phase == "after":
            for service in services.values():
                service.sync_weights(other)
        for name, service in services.items():
            completions = service.generate(mine, GREEDY)
            results[f"{name}/{phase}"] = [[c.prompt_index, c.token_ids] for c in completions]
        dist.barrier()  # the single-engine reference below runs on each rank alone
        results[f"single/{phase}"] = [[c.prompt_index, c.token_ids] for c in single.generate(mine, GREEDY)]
    (out_dir / f"rank{rank()}.json").write_text(json.dumps(results))
    close_distributed()  # both ranks leave together; gloo's teardown at exit could abort (SIGABRT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
