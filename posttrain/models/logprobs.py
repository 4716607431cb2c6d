"""Log-probs of responses under a model, as every trainer needs them: per sequence, per pair, per completion.

`model` is anything with `CausalLMWithLogprobs`' forward (the wrapper itself, or the DeepSpeed engine
training one): `model(input_ids, targets, position_ids=, attention_mask=, temperature=)` returns per-token
(logprobs, entropy) of `targets`. `temperature` divides the logits, so the log-probs are those of the
distribution a sampler drew from at that temperature.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from posttrain.data.batching import collate_packed, pack_token_budget
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.data.preference import PairBatch, PreferenceExample, collate_pairs, pair_lengths
from posttrain.engine.distributed import all_reduce_max


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


def collate_shared_prompts(
    examples: Sequence[TokenizedExample], prompt_lengths: Sequence[int]
) -> tuple[dict, list[tuple[int, int]]]:
    """One packed row that holds each distinct prompt once, followed by the completions of every example that
    starts with it (in order of first appearance), and where each example's completion targets sit:

    inputs: input_ids and position_ids [1, N] (a completion's positions continue its prompt's), targets [M] (the
    completion labels of every example) with target_positions [M] (the row position each is predicted from: the
    prompt's last position for a completion's first token), and prompt_groups ((prompt length, completion
    lengths) per prompt, for `decoder_hidden_states`). spans[b]: (start, length) of example b's targets in M."""
    members: dict[tuple[int, ...], list[int]] = {}
    for index, (example, prompt) in enumerate(zip(examples, prompt_lengths)):
        if prompt < 1:
            raise ValueError(f"example {index} has an empty prompt: nothing to predict its first completion token from")
        members.setdefault(tuple(example.input_ids[:prompt]), []).append(index)
    input_ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    target_positions: list[int] = []
    groups: list[tuple[int, tuple[int, ...]]] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(examples)
    for prompt_ids, indices in members.items():
        prompt, last = len(prompt_ids), len(input_ids) + len(prompt_ids) - 1
        input_ids += prompt_ids
        positions += range(prompt)
        lengths = []
        for index in indices:
            completion, labels = examples[index].input_ids[prompt:], examples[index].labels[prompt:]
            start, length = len(input_ids), len(completion)
            spans[index] = (len(targets), length)
            targets += labels
            target_positions += [last, *range(start, start + length - 1)][:length]
            input_ids += completion
            positions += range(prompt, prompt + length)
            lengths.append(length)
        groups.append((prompt, tuple(lengths)))
    inputs = {
        "input_ids": torch.tensor([input_ids]),
        "position_ids": torch.tensor([positions]),
        "targets": torch.tensor(targets, dtype=torch.long),
        "target_positions": torch.tensor(target_positions, dtype=torch.long),
        "prompt_groups": groups,
    }
    return inputs, spans


def shared_prompt_logprobs(
    model, examples: Sequence[TokenizedExample], prompt_lengths: Sequence[int], temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`completion_logprobs` from a forward over `collate_shared_prompts`' row: each prompt once."""
    inputs, spans = collate_shared_prompts(examples, prompt_lengths)
    device = model_device(model)
    groups = inputs.pop("prompt_groups")
    inputs = {key: value.to(device) for key, value in inputs.items()}
    token_logprobs, token_entropy = model(temperature=temperature, prompt_groups=groups, **inputs)
    width = max(length for _, length in spans)
    rows = torch.tensor([row for row, (_, length) in enumerate(spans) for _ in range(length)], dtype=torch.long)
    columns = torch.tensor([column for _, length in spans for column in range(length)], dtype=torch.long)
    order = torch.tensor([start + column for start, length in spans for column in range(length)], dtype=torch.long)
    rows, columns, order = rows.to(device), columns.to(device), order.to(device)
    logprobs = token_logprobs.new_zeros(len(spans), width)
    entropy, mask = torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    logprobs = logprobs.index_put((rows, columns), token_logprobs.index_select(0, order))
    entropy = entropy.index_put((rows, columns), token_entropy.index_select(0, order))
    mask[rows, columns] = 1.0
    return logprobs, entropy, mask


def completion_logprobs(
    model,
    examples: Sequence[TokenizedExample],
    prompt_lengths: Sequence[int],
    temperature: float = 1.0,
    share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropy, mask), each [B, L] float32, of every example's completion tokens from ONE packed
    forward: row b holds the log-probs (and entropies) of the tokens after `prompt_lengths[b]`, padded with
    zeros to the longest completion L; `mask` is 1 on real completion tokens. `share_prompts` (the model must
    support it: `CausalLMWithLogprobs.shares_prompts`): examples with the same prompt put it in the forward once
    (`shared_prompt_logprobs`); same results, fewer tokens through the model."""
    if share_prompts:
        return shared_prompt_logprobs(model, examples, prompt_lengths, temperature)
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


def scoring_batches(
    sizes: Sequence[Sequence[int]], micro_batch_size: int, max_tokens: int | None, padded: bool
) -> list[list[int]]:
    """Positions of the items in each no-grad scoring forward: `micro_batch_size` items at a time in order, or,
    with `max_tokens` (train.max_tokens_per_micro_batch), packed up to that many tokens a forward
    (`pack_token_budget`: sizes[i] are the sequence lengths item i puts in a forward; `padded`: the forward pads
    to the longest), the bound the training forwards keep. Every position appears in exactly one batch."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    positions = list(range(len(sizes)))
    if max_tokens is None:
        return [positions[start : start + micro_batch_size] for start in range(0, len(positions), micro_batch_size)]
    return pack_token_budget(positions, sizes, max_tokens, padded)


def agreed_batches(batches: list[list[int]]) -> Iterator[list[int] | None]:
    """`batches`, then None up to the most batches any rank has (a collective): under ZeRO-3 every forward gathers
    parameters on every rank, so all run as many; the caller runs an idle forward for each None."""
    count = int(all_reduce_max([float(len(batches))])[0])
    for index in range(count):
        yield batches[index] if index < len(batches) else None


@torch.no_grad()
def completion_logprob_rows(
    model,
    examples: Sequence[TokenizedExample],
    prompt_lengths: Sequence[int],
    micro_batch_size: int,
    temperature: float = 1.0,
    max_tokens: int | None = None,
    share_prompts: bool = False,
) -> list[torch.Tensor]:
    """Each completion's token log-probs [L_b] under `model` (no grad), in the order of `examples`:
    `micro_batch_size` completions a forward, or packed up to `max_tokens` tokens a forward (`scoring_batches`;
    `share_prompts`: a forward holds each of its prompts once, see `completion_logprobs`). Ranks with fewer
    forwards run idle ones up to the largest count (`agreed_batches`): a collective."""
    batches = scoring_batches([[len(example.input_ids)] for example in examples], micro_batch_size, max_tokens, False)
    rows: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    for batch in agreed_batches(batches):
        if batch is None:
            idle_forward(model)
            continue
        chosen = [examples[i] for i in batch]
        prompts = [prompt_lengths[i] for i in batch]
        logprobs, _, mask = completion_logprobs(model, chosen, prompts, temperature, share_prompts)
        for row, position in enumerate(batch):
            rows[position] = logprobs[row, : int(mask[row].sum())]
    return rows


def idle_example(token_id: int = 0) -> TokenizedExample:
    """A two-token dummy sequence with one target: what a rank with no data of its own feeds a forward."""
    return TokenizedExample([token_id, token_id], [IGNORE_INDEX, token_id])


@torch.no_grad()
def idle_forward(model) -> None:
    """A forward on `idle_example()` whose result is dropped: keeps this rank in step with the others' forwards."""
    completion_logprobs(model, [idle_example()], [1])


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
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of every pair ([N] chosen, [N] rejected, on CPU) under `model`, in eval mode:
    `micro_batch_size` pairs a forward, or packed up to `max_tokens` tokens a forward (`scoring_batches`; a pair's
    two sequences share one). Ranks with fewer forwards run idle ones (`agreed_batches`): a collective."""
    was_training = model.training
    model.eval()
    sizes = [pair_lengths(pair) for pair in pairs]
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for batch in agreed_batches(scoring_batches(sizes, micro_batch_size, max_tokens, padded=not packing)):
        if batch is None:
            idle_forward(model)
            continue
        collated = collate_pairs([pairs[i] for i in batch], packing, pad_token_id)
        winner, loser = pair_logprob_sums(model, collated.to(model_device(model)), temperature)
        chosen[batch], rejected[batch] = winner.float().cpu(), loser.float().cpu()
    model.train(was_training)
    return chosen, rejected
