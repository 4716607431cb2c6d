"""Padding each layout of a DPO micro-batch computes, on the data of dpo_vs_trl.py: tokens per step / real tokens.

    python benchmarks/packed_padding.py                  # 48 pairs of 8-34-digit sums, 16 pairs a micro-batch

Layouts of a micro-batch's 2 x pairs sequences (chosen and rejected): `split` (posttrain with sdpa on a known model
type: the decoder runs the packed row, no padding), `layout` (`posttrain.models.attention.row_layout`: rows of the
longest sequence, first-fit-decreasing; the decoder runs the rows' padding too) and `trl` (TRL's DPOTrainer pads
chosen and rejected to the batch's longest sequence). Micro-batches: the pairs in data order, then 5 shuffles.
Sequence lengths are prompt + response rendered with the chat template (dpo_vs_trl.sequence_lengths). No model runs.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16, help="pairs per micro-batch")
    parser.add_argument("--num-pairs", type=int, default=48)
    parser.add_argument("--min-digits", type=int, default=8)
    parser.add_argument("--max-digits", type=int, default=34)
    parser.add_argument("--hidden", type=int, default=512, help="row_layout's cost model")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    from dpo_vs_trl import preference_rows, sequence_lengths

    from posttrain.models.attention import row_layout
    from posttrain.models.tokenizer import train_tokenizer

    rows = preference_rows(args.num_pairs, args.min_digits, args.max_digits)
    texts = [m["content"] for row in rows for key in ("prompt", "chosen", "rejected") for m in row[key]]
    lengths = sequence_lengths(train_tokenizer(texts, vocab_size=512), rows)
    pairs = list(zip(lengths[0::2], lengths[1::2]))
    print(f"{len(pairs)} pairs; sequence tokens min {min(lengths)}, max {max(lengths)}")
    print("| micro-batch order | real tokens | layout (x real) | trl (x real) |\n|---|---|---|---|")
    orders = [("data", list(range(len(pairs))))]
    orders += [(f"shuffle {seed}", random.Random(seed).sample(range(len(pairs)), len(pairs))) for seed in range(5)]
    for name, order in orders:
        real = laid_out = padded = 0
        for start in range(0, len(order), args.pairs):
            batch = [pairs[i] for i in order[start : start + args.pairs]]
            sequences = [pair[0] for pair in batch] + [pair[1] for pair in batch]
            layout = row_layout(torch.cat([torch.arange(n) for n in sequences])[None], args.hidden)
            real += sum(sequences)
            laid_out += layout.index.numel() if layout is not None else sum(sequences)
            padded += len(sequences) * max(sequences)
        print(f"| {name} | {real} | {laid_out} ({laid_out / real:.3f}) | {padded} ({padded / real:.3f}) |")


if __name__ == "__main__":
    main()
