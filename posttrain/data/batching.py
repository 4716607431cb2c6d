"""Deterministic step-wise batching and the packing (padding-free) / padding collators.

Optimizer step s consumes examples perm[s*B : (s+1)*B] of a seeded per-epoch permutation, with
B = micro_batch_size x grad_accum x world_size. Every rank can therefore count the target tokens of
the whole step locally (no all-reduce), and the same examples form a step whatever the split into
micro-batches and ranks — which is what makes micro-batch 1 x accum 8 equal micro-batch 8 x accum 1.
With `train.max_tokens_per_micro_batch`, a rank's examples of a step are re-packed into micro-batches of at
most that many tokens (`pack_token_budget`); the losses are scaled by each micro-batch's share of the step's
normaliser, so the gradient stays the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from posttrain.data.chat import IGNORE_INDEX, TokenizedExample

log = logging.getLogger("posttrain")
T = TypeVar("T")


@dataclass(frozen=True)
class StepPlan:
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    num_examples: int
    seed: int

    @property
    def examples_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # A trailing partial step is dropped so every step has the same shape.
        return self.num_examples // self.examples_per_step

    def step_indices(self, step: int) -> list[int]:
        """Example indices of global optimizer step `step` (0-based), all ranks and micro-batches."""
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_examples} examples are fewer than one optimizer step "
                f"({self.examples_per_step} = micro_batch_size x gradient_accumulation_steps x world_size)"
            )
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.num_examples, generator=generator)
        start = step_in_epoch * self.examples_per_step
        return permutation[start : start + self.examples_per_step].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's micro-batches of step `step`, in order."""
        indices = self.step_indices(step)
        per_micro = self.micro_batch_size * self.world_size
        return [
            indices[m * per_micro + rank * self.micro_batch_size : m * per_micro + (rank + 1) * self.micro_batch_size]
            for m in range(self.gradient_accumulation_steps)
        ]


def shifted_targets(labels: Sequence[int]) -> list[int]:
    """targets[t] = labels[t + 1]: the token position t predicts; the last position predicts nothing. `labels` is
    a list or an `array("i")` (SFT examples)."""
    targets = list(labels[1:])
    targets.append(IGNORE_INDEX)
    return targets


def collate_packed(examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
    """Pack examples into one row [1, total]; position_ids restart at 0 for each document.

    transformers derives a block-diagonal causal mask from the restarting position_ids (and
    flash-attn's varlen path does the same on GPU), so no token attends across documents.
    Targets are shifted inside each document, so no document predicts the next one's first token.
    """
    input_ids, positions, targets = [], [], []
    for example in examples:
        input_ids += example.input_ids
        positions += list(range(len(example.input_ids)))
        targets += shifted_targets(example.labels)
    return {
        "input_ids": torch.tensor([input_ids]),
        "position_ids": torch.tensor([positions]),
        "targets": torch.tensor([targets]),
    }


def collate_padded(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one; attention_mask marks real tokens."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id)
    targets = torch.full((len(examples), length), IGNORE_INDEX)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        targets[row, :n] = torch.tensor(shifted_targets(example.labels))
        attention_mask[row, :n] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask, "targets": targets}


def collate(examples: list[TokenizedExample], packing: bool, pad_token_id: int) -> dict[str, torch.Tensor]:
    return collate_packed(examples) if packing else collate_padded(examples, pad_token_id)


def count_target_tokens(examples: list[TokenizedExample]) -> int:
    return sum(example.num_target_tokens for example in examples)


def split_evenly(items: list, parts: int) -> list[list]:
    """`items` split into exactly `parts` contiguous, near-equal chunks (the first ones one longer; some may be
    empty when there are fewer items than parts)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        out.append(items[start:end])
        start = end
    return out


def micro_batch_tokens(sequence_lengths: Sequence[int], padded: bool) -> int:
    """Tokens one forward over these sequences processes: their sum packed, count x longest padded."""
    if not sequence_lengths:
        return 0
    return len(sequence_lengths) * max(sequence_lengths) if padded else sum(sequence_lengths)


def pack_token_budget(items: Sequence[T], sizes: Sequence[Sequence[int]], budget: int, padded: bool) -> list[list[T]]:
    """`items` in micro-batches whose forwards hold at most `budget` tokens (`micro_batch_tokens`).

    sizes[i] are the sequence lengths item i puts in a forward: one for an example, (chosen, rejected) for a
    pair, whose sequences therefore always share a micro-batch. First-fit decreasing: items in order of
    decreasing tokens (ties: the earlier first) each go to the first micro-batch they fit in, else a new one.
    Within a micro-batch items keep their order in `items`; micro-batches are ordered by their first item. Every
    item lands in exactly one micro-batch, deterministically; an item over the budget alone forms its own
    micro-batch (logged as a warning): the budget bounds every other forward.
    """
    if budget < 1:
        raise ValueError(f"a token budget of {budget} fits nothing; train.max_tokens_per_micro_batch must be >= 1")
    if len(items) != len(sizes):
        raise ValueError(f"{len(items)} items but {len(sizes)} sizes")
    order = sorted(range(len(items)), key=lambda i: (-micro_batch_tokens(sizes[i], padded), i))
    bins: list[tuple[list[int], list[int]]] = []  # (item positions, their sequence lengths)
    for position in order:
        lengths = list(sizes[position])
        fits = [b for b in bins if micro_batch_tokens(b[1] + lengths, padded) <= budget]
        if fits:
            fits[0][0].append(position)
            fits[0][1].extend(lengths)
            continue
        if micro_batch_tokens(lengths, padded) > budget:
            log.warning(
                "an example of %d tokens exceeds train.max_tokens_per_micro_batch=%d: it forms a micro-batch of its "
                "own; raise the budget (or lower data.max_length) to bound every forward",
                micro_batch_tokens(lengths, padded),
                budget,
            )
        bins.append(([position], lengths))
    groups = sorted(sorted(positions) for positions, _ in bins)
    return [[items[p] for p in positions] for positions in groups]
