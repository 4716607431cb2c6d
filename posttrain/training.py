"""Small mechanics every trainer shares: seeding, step counts, device moves, pair log-probs, step scaling.

Trainers do not import each other; what two of them need lives here.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from posttrain.data.batching import StepPlan
from posttrain.data.loading import load_rows
from posttrain.data.preference import PairBatch, build_preference_examples, preference_texts, sequence_logprob_sums
from posttrain.models.loading import load_tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_optimizer_steps(plan: StepPlan, train_cfg) -> int:
    """Optimizer steps of the run: `train.epochs` over the data, capped (or set) by `train.max_steps`."""
    total = plan.steps_per_epoch * train_cfg.epochs
    if train_cfg.max_steps > 0:
        total = min(total, train_cfg.max_steps) if train_cfg.epochs > 0 else train_cfg.max_steps
    return total


def batch_to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def pair_logprob_sums(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) sums of response-token log-probs from ONE forward of `model`
    (a `CausalLMWithLogprobs` or an engine wrapping one) over the pair batch."""
    inputs = dict(batch.inputs)
    targets = inputs.pop("targets")
    token_logprobs, _ = model(targets=targets, **inputs)
    sums = sequence_logprob_sums(token_logprobs, targets, batch.segment_ids, 2 * batch.num_pairs)
    return sums[: batch.num_pairs], sums[batch.num_pairs :]


def pair_loss_scale(pairs_in_micro_batch: int, plan: StepPlan) -> float:
    """Factor turning a micro-batch's mean-over-pairs loss into its share of the step's mean.

    Summing micro-batch gradients (engine.backward with scale_wrt_gas=False) and DeepSpeed's mean over
    ranks then gives the gradient of the mean over all pairs of the step, whatever the split:
    scale = pairs_in_micro_batch * world_size / pairs_per_step.
    """
    return pairs_in_micro_batch * plan.world_size / plan.examples_per_step


def load_preference_data(cfg, run_dir: Path):
    """(tokenizer, train pairs, eval pairs) per `cfg.data` / `cfg.model`, all validated before anything is
    written; the tiny model's tokenizer is trained on the pairs' text, or reused from run_dir/tokenizer."""
    train_rows, eval_rows = load_rows(cfg.data, "train"), load_rows(cfg.data, "eval")
    saved = Path(run_dir) / "tokenizer"
    tokenizer = load_tokenizer(cfg.model, preference_texts(train_rows), saved if saved.exists() else None)
    train_examples, _ = build_preference_examples(train_rows, tokenizer, cfg.data, "train")
    eval_examples = build_preference_examples(eval_rows, tokenizer, cfg.data, "eval")[0] if eval_rows else []
    return tokenizer, train_examples, eval_examples
