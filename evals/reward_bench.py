"""RewardBench-style evaluation of any posttrain reward model (Bradley-Terry or GPM head).

Rows (JSONL / JSON / Parquet, or a list of dicts) in RewardBench's format:
    {"prompt": "...", "chosen": "...", "rejected": "...", "subset": "chat-easy"}
(`prompt` may also be a list of chat messages, `chosen` / `rejected` assistant messages, as in
`posttrain.data.preference`). A pair is right when the model prefers chosen: s(chosen > rejected) > 0,
i.e. r_c > r_r for BT and the skew-symmetric GPM score for GPM; an exact tie counts 1/2.
Reported: accuracy per subset, `mean` (the unweighted mean over subsets, how RewardBench averages within
a section) and `overall` (the fraction of all pairs); RewardBench's section weighting is left to callers.

    python -m evals.reward_bench --model runs/rm/final --data bench.jsonl [--batch-size 16 --max-length 2048]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from posttrain.config import DataConfig
from posttrain.data.preference import build_preference_examples
from posttrain.data.sources import SourceRow, read_file
from posttrain.errors import DataError
from posttrain.models.reward import load_reward_model, score_pairs


def bench_rows(rows: list[dict] | list[SourceRow], source: str = "rows") -> list[SourceRow]:
    """Rows with provenance; every row must name its subset."""
    rows = [row if isinstance(row, SourceRow) else SourceRow(source, i, row) for i, row in enumerate(rows, start=1)]
    for row in rows:
        if not isinstance(row.row, dict) or not isinstance(row.row.get("subset"), str):
            raise DataError(
                f'{row.where()} has no "subset" string; RewardBench rows are {{prompt, chosen, rejected, subset}}'
            )
    return rows


def accuracy_by_subset(scores: torch.Tensor, subsets: list[str]) -> dict[str, float]:
    """Per-subset accuracy of pair scores s(chosen > rejected) (ties 1/2), plus `mean` over subsets and `overall`."""
    right = (scores > 0).float() + 0.5 * (scores == 0).float()
    grouped: dict[str, list[float]] = defaultdict(list)
    for subset, value in zip(subsets, right.tolist()):
        grouped[subset].append(value)
    result = {subset: sum(values) / len(values) for subset, values in sorted(grouped.items())}
    return {**result, "mean": sum(result.values()) / len(result), "overall": float(right.mean())}


def evaluate_reward_bench(model, tokenizer, rows, batch_size: int = 16, max_length: int = 2048) -> dict[str, float]:
    """Accuracies (see `accuracy_by_subset`) of `model` (a `RewardModel`) on RewardBench-format `rows`.

    Every row must be scorable: over-long or malformed rows raise a DataError naming the row.
    """
    rows = bench_rows(rows)
    examples, _ = build_preference_examples(
        rows, tokenizer, DataConfig(max_length=max_length, truncation="error"), "reward bench"
    )
    scores = score_pairs(model, examples, tokenizer.pad_token_id, batch_size=batch_size)
    return accuracy_by_subset(scores, [row.row["subset"] for row in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a reward-model directory (posttrain algo=rm final/)")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args(argv)
    model, tokenizer = load_reward_model(args.model)
    print(
        json.dumps(
            evaluate_reward_bench(model, tokenizer, read_file(args.data), args.batch_size, args.max_length), indent=2
        )
    )


if __name__ == "__main__":
    main()
