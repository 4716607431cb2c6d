"""Distillation mechanics over a micro-batch of examples: teacher logits, the student's divergence, distances.

Every function takes `model` with `CausalLMWithLogprobs`' forward (the wrapper, a frozen ZeRO-3 engine holding
one, or the training engine) and a list of `TokenizedExample`s, packed into one row; a position is scored when its
target (the next label) is not IGNORE_INDEX, so prompt tokens never are. All functions over the same examples
return their M scored positions in the same order. What each needs in memory (per micro-batch, V the vocabulary):

- `teacher_logits`: [M, V] float32 (no grad), built `chunk_size` rows at a time from the lm_head;
- `student_vocab_divergence`: that [M, V] plus one [chunk_size, V] tile of the student (checkpointed);
- `target_logprobs` (the sampled estimator): [M] through the fused log-prob op, no [M, V] tensor at all;
- `vocab_distances` (eval): [M, V] per model compared, no grad.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from posttrain.data.batching import collate_packed
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.engine.distributed import all_reduce_max, all_reduce_sum
from posttrain.errors import ConfigError
from posttrain.losses import DIVERGENCES
from posttrain.losses.distill import chunked_vocab_divergence
from posttrain.models.logprobs import model_device

DISTANCE_NAMES = ("forward_kl", "reverse_kl", "jsd")  # reported by `vocab_distances` (jsd with beta 0.5)


def packed_batch(model, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
    return {key: value.to(model_device(model)) for key, value in collate_packed(list(examples)).items()}


@torch.no_grad()
def teacher_logits(
    model, examples: Sequence[TokenizedExample], temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """The model's next-token logits / temperature at the M scored positions: [M, V] float32, no grad."""

    def logits(rows, weight, bias):
        tiles = []
        for start in range(0, rows.shape[0], chunk_size):
            tile = rows[start : start + chunk_size].float() @ weight.float().t()
            tiles.append((tile if bias is None else tile + bias.float()) / temperature)
        return torch.cat(tiles) if tiles else rows.new_zeros(0, weight.shape[0], dtype=torch.float32)

    return model(head_fn=logits, **packed_batch(model, examples))


def student_vocab_divergence(
    model,
    examples: Sequence[TokenizedExample],
    teacher: torch.Tensor,
    divergence: str,
    beta: float = 0.5,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-position full-vocabulary `divergence` (DIVERGENCES) of the student `model` against the teacher logits
    [M, V] (from `teacher_logits` on the same examples): [M] float32, differentiable w.r.t. the student."""
    fn = DIVERGENCES.get(divergence, "algo.divergence").fn

    def head_fn(rows, weight, bias):
        return chunked_vocab_divergence(rows, weight, teacher, fn, beta=beta, student_bias=bias, chunk_size=chunk_size)

    return model(head_fn=head_fn, **packed_batch(model, examples))


def target_logprobs(model, examples: Sequence[TokenizedExample]) -> torch.Tensor:
    """log p(target) at the M scored positions, [M] float32, through the fused log-prob op (grad if enabled)."""
    batch = packed_batch(model, examples)
    logprobs, _ = model(**batch)
    return logprobs[batch["targets"] != IGNORE_INDEX]


@torch.no_grad()
def vocab_distances(
    student, others: dict[str, object], examples: Sequence[TokenizedExample], chunk_size: int = 1024
) -> dict[str, float]:
    """Sums over the M scored positions of forward KL, reverse KL and JSD(0.5) between the student and each of
    `others` (name -> model): {"<name>_<divergence>": sum}, plus "tokens": M (divide to get per-token means)."""
    student_logits = teacher_logits(student, examples, chunk_size=chunk_size)
    sums = {"tokens": float(student_logits.shape[0])}
    for name, model in others.items():
        other = teacher_logits(model, examples, chunk_size=chunk_size)
        for divergence in DISTANCE_NAMES:
            fn = DIVERGENCES.get(divergence).fn
            values = [fn(student_logits[s : s + chunk_size], other[s : s + chunk_size], beta=0.5)
                      for s in range(0, other.shape[0], chunk_size)]  # fmt: skip
            sums[f"{name}_{divergence}"] = float(torch.cat(values).sum()) if values else 0.0
    return sums


def padding_example(tokenizer) -> TokenizedExample:
    """A one-scored-token example for a rank with nothing to do: it still runs the forward the others run."""
    eos = tokenizer.eos_token_id
    return TokenizedExample([eos, eos], [IGNORE_INDEX, eos])


def held_out_distances(
    student,
    others: dict[str, object],
    examples: Sequence[TokenizedExample],
    micro_batch_size: int,
    chunk_size: int,
    padding: TokenizedExample,
) -> dict[str, float]:
    """Per-token means over every rank's `examples` of `vocab_distances` ({"<name>_<divergence>": mean}; {} when
    no rank has any). Every rank runs the same number of forwards (ZeRO-3 gathers in each): a rank out of
    examples scores `padding` (`padding_example`) and drops the result."""
    batches = int(all_reduce_max([float(-(-len(examples) // micro_batch_size))])[0])
    totals: dict[str, float] = {}
    for start in range(0, batches * micro_batch_size, micro_batch_size):
        chunk = list(examples[start : start + micro_batch_size])
        sums = vocab_distances(student, others, chunk or [padding], chunk_size)
        totals = {key: totals.get(key, 0.0) + (value if chunk else 0.0) for key, value in sums.items()}
    if not totals:
        return {}
    totals = dict(zip(totals, all_reduce_sum(list(totals.values()))))
    tokens = max(totals.pop("tokens"), 1.0)
    return {key: value / tokens for key, value in totals.items()}


def check_vocabularies(student, others: dict[str, object]) -> None:
    """ConfigError naming the key when a model of `others` (key -> model or None) has another vocabulary size."""
    size = vocabulary_size(student)
    for key, model in others.items():
        if model is not None and vocabulary_size(model) != size:
            raise ConfigError(
                f"{key} has a vocabulary of {vocabulary_size(model)} tokens, the student {size}: distillation "
                "compares next-token distributions, so both need the same tokenizer"
            )


def vocabulary_size(model) -> int:
    """`config.vocab_size` of the causal LM inside a CausalLMWithLogprobs (or a frozen engine holding one)."""
    module = model.module if hasattr(model, "module") else model
    return module.policy.config.vocab_size
