"""Run by test_rollout_groups.py as `torchrun --nproc_per_node=2 eval_groups_script.py OUT_DIR` (CPU, gloo).

Evals through one rollout group of 2 ranks (`hf` backend, tensor_parallel_size=2: the same group path a
vLLM engine over 2 ranks takes) with fewer eval prompts than ranks (1 prompt: rank 1 has none) and with prompts
that do not divide evenly (3), and training rounds whose sampling differs per rank (seeded per rank, as RLVR's).
Before the fix rank 1 skipped generate and rank 0 waited for it in the group's gather: a hang. Every rank writes
OUT_DIR/rank{r}.json with what the group returned and what a single engine with no group returns (the reference).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]  # repo, tests/

from rollout_helpers import save_policy_dir, tiny_policy  # noqa: E402

from posttrain.data.prompts import PromptRow  # noqa: E402
from posttrain.engine.distributed import all_reduce_sum, barrier, close_distributed, init_distributed, rank, world_size  # noqa: E402
from posttrain.models.tokenizer import train_tokenizer  # noqa: E402
from posttrain.rewards.reward import verified_fraction  # noqa: E402
from posttrain.rollout import RolloutConfig, SamplingConfig, build_rollout_service  # noqa: E402
from posttrain.rollout.samples import grouped_completions, load_or_draw_samples  # noqa: E402
from posttrain.rollout.service import RolloutService  # noqa: E402

TEXTS = ["What is 12 + 35?", "Add 7 and 48.", "Compute 203 + 119."]
GREEDY = SamplingConfig(temperature=0.0, max_tokens=8)


def token_ids(groups) -> list:
    return [[c.token_ids for c in group] for group in groups]


def main(out_dir: Path) -> None:
    init_distributed()
    tokenizer = train_tokenizer([*TEXTS, "The answer is 0123456789."] * 8, vocab_size=300)
    model_dir = out_dir / "policy"
    if rank() == 0:
        save_policy_dir(tiny_policy(tokenizer, seed=0), tokenizer, model_dir)
    barrier()
    grouped = build_rollout_service(RolloutConfig(backend="hf", tensor_parallel_size=2), model_dir, tokenizer)
    single = RolloutService(grouped.backend, tokenizer, grouped.cfg)  # the same engine without a group
    prompts = [[{"role": "user", "content": text}] for text in TEXTS]
    # Ground truths: the greedy answers to prompts 0 and 2, a wrong one to prompt 1 (so accuracies are 1 and 2/3).
    greedy_texts = [c.text for c in single.generate(prompts, GREEDY)]
    truths = [greedy_texts[0], "no such answer", greedy_texts[2]]
    rows = [PromptRow(p, "string_match", t, f"eval row {i}") for i, (p, t) in enumerate(zip(prompts, truths))]
    results = {"group": grouped.group.ranks, "world": world_size()}
    for count in (1, 3):  # fewer eval prompts than ranks; a count that does not divide by the ranks
        mine = prompts[:count][rank() :: world_size()]
        results[f"{count}/verified_fraction"] = verified_fraction(grouped, rows[:count], GREEDY, 5.0)
        results[f"{count}/mine"] = len(mine)
        results[f"{count}/grouped"] = token_ids(grouped_completions(grouped, mine, GREEDY))
        results[f"{count}/single"] = token_ids(grouped_completions(single, mine, GREEDY))
        drawn = load_or_draw_samples(out_dir / f"initial.{count}.rank{rank()}.jsonl", grouped, mine, GREEDY, False)
        results[f"{count}/initial_samples"] = drawn
        results[f"{count}/initial_reference"] = [[c.text for c in g] for g in grouped_completions(single, mine, GREEDY)]
    # RLVR rounds: each rank samples its own prompts with its own seed; rank 1 has none in the second round.
    for round_number, counts in enumerate([(2, 1), (1, 0)]):
        mine = prompts[: counts[rank()]]
        sampled = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=1000 * round_number + 17 * rank())
        results[f"round{round_number}/grouped"] = token_ids(grouped_completions(grouped, mine, sampled))
        results[f"round{round_number}/single"] = token_ids(grouped_completions(single, mine, sampled))
    results["ranks_after"] = all_reduce_sum([1.0])[0]  # both ranks got here, with their collectives in step
    (out_dir / f"rank{rank()}.json").write_text(json.dumps(results))
    close_distributed()  # both ranks leave together; gloo's teardown at exit could abort (SIGABRT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
