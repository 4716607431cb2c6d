"""Log-probs of responses under a model, as every trainer needs them: per sequence, per pair, per completion.

`model` is anything with `CausalLMWithLogprobs`' forward (the wrapper itself, or the DeepSpeed engine
training one): `model(input_ids, targets, position_ids=, attention_mask=, temperature=)` returns per-token
(logprobs, entropy) of `targets`. `temperature` divides the logits, so the log-probs are those of the
distribution a sampler drew from at that temperature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from posttrain.data.batching import collate_packed
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.data.preference import PairBatch, PreferenceExample, collate_pairs


def model_device(model) -> torch.device:
    return model.device if hasattr(model, "device") else next(model.parameters()).device


def sequence_logprob_sums(token_logprobs, targets, segment_ids, num_sequences: int) -> torch.Tensor:
    """Per-sequence SUM of the target-token log-probs: [num_sequences] float32 (differentiable).

    token_logprobs, targets, segment_ids share one shape ([1, N] packed or [S, T] padded); tokens whose
    target is IGNORE_INDEX (prompt, padding, the last token) contribute nothing.
    """
    mask = targets != IGNORE_INDEX
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=token_logprobs.device)
    return sums.index_add(0, segment_ids[mask], token_logprobs[mask].float())


def pair_logprob_sums(model, batch: PairBatch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) sums of response-token log-probs from ONE forward over the pair batch."""
    inputs = dict(batch.inputs)
    targets = inputs.pop("targets")
    token_logprobs, _ = model(targets=targets, temperature=temperature, **inputs)
    sums = sequence_logprob_sums(token_logprobs, targets, batch.segment_ids, 2 * batch.num_pairs)
    return sums[: batch.num_pairs], sums[batch.num_pairs :]


def completion_logprobs(
    model, examples: Sequence[TokenizedExample], prompt_lengths: Sequence[int], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropy, mask), each [B, L] float32, of every example's completion tokens from ONE packed
    forward: row b holds the log-probs (and entropies) of the tokens after `prompt_lengths[b]`, padded with
    zeros to the longest completion L; `mask` is 1 on real completion tokens."""
    batch = {key: value.to(model_device(model)) for key, value in collate_packed(list(examples)).items()}
    targets = batch.pop("targets")
    token_logprobs, token_entropy = model(targets=targets, temperature=temperature, **batch)
    lengths = [len(example.input_ids) - prompt for example, prompt in zip(examples, prompt_lengths)]
    logprobs = token_logprobs.new_zeros(len(lengths), max(lengths))
    entropy, mask = torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    offset = 0
    for row, (example, prompt, length) in enumerate(zip(examples, prompt_lengths, lengths)):
        # Completion token k sits at position prompt + k and is predicted from the one before.
        start = offset + prompt - 1
        logprobs[row, :length] = token_logprobs[0, start : start + length]
        entropy[row, :length] = token_entropy[0, start : start + length]
        mask[row, :length] = 1.0
        offset += len(example.input_ids)
    return logprobs, entropy, mask


@torch.no_grad()
def completion_logprob_rows(
    model,
    examples: Sequence[TokenizedExample],
    prompt_lengths: Sequence[int],
    micro_batch_size: int,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Each completion's token log-probs [L_b] under `model` (no grad), `micro_batch_size` completions a forward."""
    rows = []
    for start in range(0, len(examples), micro_batch_size):
        end = start + micro_batch_size
        logprobs, _, mask = completion_logprobs(model, examples[start:end], prompt_lengths[start:end], temperature)
        rows += [logprobs[row, : int(mask[row].sum())] for row in range(len(logprobs))]
    return rows


def padded_rows(rows: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Rows of different lengths as one tensor shaped (and typed, placed) like `like` [B, L], zero-padded."""
    out = torch.zeros_like(like)
    for index, row in enumerate(rows):
        out[index, : row.numel()] = row.to(out.device)
    return out


@torch.no_grad()
def pair_logprob_rows(
    model,
    pairs: Sequence[PreferenceExample],
    micro_batch_size: int,
    packing: bool,
    pad_token_id: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of every pair ([N] chosen, [N] rejected, on CPU) under `model`, in eval mode,
    `micro_batch_size` pairs per forward."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), micro_batch_size):
        batch = collate_pairs(list(pairs[start : start + micro_batch_size]), packing, pad_token_id)
        winner, loser = pair_logprob_sums(model, batch.to(model_device(model)), temperature)
        chosen.append(winner.cpu())
        rejected.append(loser.cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)
