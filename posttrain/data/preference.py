"""Preference pairs: validated, tokenised (prompt, chosen, rejected) triples with response-only labels.

Two row formats are accepted (the common ones on the hub):
- explicit prompt: {"prompt": [messages] | "text", "chosen": [messages] | "text", "rejected": ...};
  the responses are the assistant turn(s) that follow the prompt (a string is one assistant turn).
- full conversations: {"chosen": [...whole conversation], "rejected": [...whole conversation]}; the
  prompt is the longest common prefix of messages, which must end before the first differing
  assistant turn.

Each response is rendered with the tokenizer's chat template exactly as SFT renders a conversation
(`posttrain.data.chat.tokenize_conversation`), then only the response's tokens keep labels: prompt
tokens (earlier assistant turns included) are masked, so the prompt is shared and never counted.
Sequences end at the response's last labelled token (its end-of-turn token), which is also the token
a reward model reads its score from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from posttrain.data.batching import collate
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample, render_ids, tokenize_conversation, validate_messages
from posttrain.data.sources import SourceRow
from posttrain.data.tokenization import SkipCounts, to_examples, tokenized_split
from posttrain.errors import DataError

log = logging.getLogger(__name__)

PREFERENCE_FORMAT = (
    'expected {"prompt": [messages], "chosen": [messages], "rejected": [messages]} or '
    '{"chosen": [whole conversation], "rejected": [whole conversation]}'
)


@dataclass
class PreferenceExample:
    """One pair. `chosen` / `rejected` hold prompt + response ids with labels on response tokens only."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    prompt_length: int  # tokens of the shared prompt (incl. the generation prompt), the same in both

    @property
    def num_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def _as_messages(value, role: str, where: str, field: str) -> list[dict]:
    """A plain string is one message of `role`; a list is validated as chat messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return validate_messages({field: value}, where, field=field, need_assistant=False)


def split_prompt(row, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen response, rejected response) messages of a row in either format."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        missing = [key for key in ("chosen", "rejected") if not isinstance(row, dict) or key not in row]
        raise DataError(f'{where} has no "{missing[0]}" field; {PREFERENCE_FORMAT}')
    chosen = _as_messages(row["chosen"], "assistant", where, "chosen")
    rejected = _as_messages(row["rejected"], "assistant", where, "rejected")
    if row.get("prompt") is not None:
        prompt = _as_messages(row["prompt"], "user", where, "prompt")
        if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]  # responses given with the prompt
        return prompt, chosen, rejected
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_response(prompt: list[dict], response: list[dict], where: str, name: str) -> None:
    if not prompt:
        raise DataError(
            f'{where}: the pair has no prompt (no shared leading messages and no "prompt" field); {PREFERENCE_FORMAT}'
        )
    if not response:
        raise DataError(f"{where}: the {name} response is empty (no message after the prompt)")
    if response[0]["role"] != "assistant":
        raise DataError(
            f"{where}: the {name} response must start with an assistant turn, found role {response[0]['role']!r}"
        )
    if not any(message["content"].strip() for message in response if message["role"] == "assistant"):
        raise DataError(f"{where}: the {name} response is empty (assistant content is blank)")


def validate_pair(row, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages, or a DataError naming `where` and the fix."""
    prompt, chosen, rejected = split_prompt(row, where)
    _check_response(prompt, chosen, where, "chosen")
    _check_response(prompt, rejected, where, "rejected")
    if chosen == rejected:
        raise DataError(
            f"{where}: chosen and rejected responses are identical, so the pair carries no preference; drop the row"
        )
    return prompt, chosen, rejected


def tokenize_response(
    tokenizer, prompt: list[dict], response: list[dict], prompt_ids: list[int], where: str
) -> TokenizedExample:
    """prompt + response rendered as SFT renders it; labels on the response only, cut after its last label."""
    example = tokenize_conversation(tokenizer, prompt + response, where)
    if example.input_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            f"{where}: the chat template does not render the prompt as a prefix of prompt + response; cannot "
            f"share the prompt"
        )
    labels = [IGNORE_INDEX] * len(prompt_ids) + example.labels[len(prompt_ids) :]
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not labelled:
        raise DataError(f"{where}: the response renders to no trainable tokens")
    end = labelled[-1] + 1
    return TokenizedExample(example.input_ids[:end], labels[:end])


def _fit_length(example: TokenizedExample, max_length: int, truncation: str, where: str) -> TokenizedExample | None:
    """`data.max_length` per sequence: raise (error), drop the pair (skip), or cut the response (truncate)."""
    if len(example.input_ids) <= max_length:
        return example
    if truncation == "error":
        raise DataError(
            f"{where} has {len(example.input_ids)} tokens (prompt + response), more than data.max_length={max_length}; "
            "raise data.max_length or set data.truncation=truncate (or skip)"
        )
    if truncation == "skip":
        return None
    if truncation == "truncate":
        cut = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])
        return cut if cut.num_target_tokens > 0 else None
    raise DataError(f"data.truncation={truncation!r} is not one of error, truncate, skip")


def tokenize_pair(source_row: SourceRow, tokenizer, max_length: int, truncation: str) -> PreferenceExample | None:
    """The pair of one row (None when the length policy `max_length` / `truncation` drops it); bad rows raise
    DataError."""
    where = source_row.where()
    prompt, chosen, rejected = validate_pair(source_row.row, where)
    prompt_ids = render_ids(tokenizer, prompt, add_generation_prompt=True)
    sequences = []
    for response in (chosen, rejected):
        example = tokenize_response(tokenizer, prompt, response, prompt_ids, where)
        sequences.append(_fit_length(example, max_length, truncation, where))
    if None in sequences:
        return None
    if sequences[0].input_ids == sequences[1].input_ids:
        raise DataError(
            f"{where}: chosen and rejected render to identical tokens, so the pair carries no preference; drop the row"
        )
    return PreferenceExample(sequences[0], sequences[1], len(prompt_ids))


def preference_example(columns: dict) -> PreferenceExample:
    """A pair from one row of the tokenised table (`posttrain.data.tokenization`)."""
    return PreferenceExample(
        TokenizedExample(columns["chosen_input_ids"], columns["chosen_labels"]),
        TokenizedExample(columns["rejected_input_ids"], columns["rejected_labels"]),
        columns["prompt_length"],
    )


def build_preference_examples(
    rows: list[SourceRow], tokenizer, data_cfg, split: str
) -> tuple[list[PreferenceExample], SkipCounts]:
    """Tokenise every row (Arrow, `data.num_proc` processes, cached on disk with `data.cache_tokenized`); bad
    rows raise or are skipped and counted per `data.on_bad_row`."""
    table = tokenized_split("preference", rows, tokenizer, data_cfg)
    examples, skipped = to_examples(table, data_cfg, preference_example)
    if skipped.total():
        log.warning(
            "%s preference data: skipped %d bad rows and %d over-long pairs (e.g. %s)",
            split,
            skipped.bad_row,
            skipped.too_long,
            "; ".join(skipped.examples),
        )
    if not examples:
        raise DataError(
            f"the {split} preference data has {len(rows)} rows but none is usable"
            + ("; see the warnings above" if rows else "")
        )
    return examples, skipped


def separator_tokens(tokenizer, separator: str) -> frozenset[int]:
    """Ids of every token whose text contains `separator` (e.g. "\n": the tokens that end a step). A shell
    passes `algo.step_separator="\n"` as a backslash and an n; they are read as the newline meant."""
    separator = separator.replace("\\n", "\n").replace("\\t", "\t")
    if not separator:
        raise DataError("the step separator is empty; set it to the text that ends a step, e.g. '\\n'")
    found = frozenset(token_id for token_id in range(len(tokenizer)) if separator in tokenizer.decode([token_id]))
    if not found:
        raise DataError(
            f"no token of the tokenizer contains the step separator {separator!r}; pick one the tokenizer can emit"
        )
    return found


def first_divergent_step(pair: PreferenceExample, separators: frozenset[int]) -> PreferenceExample:
    """Step-DPO (Lai et al. 2024): the pair cut down to the first step where chosen and rejected differ.

    A step ends with a token in `separators` (a line ends with a newline token), or at the response's end.
    Both sequences keep the shared context up to that step (prompt and the identical earlier steps, no
    labels) and their own version of the step (labels); what follows is dropped. A sequence-level loss
    then compares the first wrong step with the right one, instead of pushing down every token after the
    mistake, most of which (the later steps, correctly worked from the wrong one) are not mistakes at all.
    """
    chosen, rejected = pair.chosen, pair.rejected
    first = pair.prompt_length
    while (
        first < min(len(chosen.input_ids), len(rejected.input_ids))
        and chosen.input_ids[first] == rejected.input_ids[first]
    ):
        first += 1
    step_start = pair.prompt_length
    for position in range(first - 1, pair.prompt_length - 1, -1):
        if chosen.input_ids[position] in separators:
            step_start = position + 1
            break

    def cut(sequence: TokenizedExample) -> TokenizedExample:
        ids = sequence.input_ids
        end = next((i + 1 for i in range(first, len(ids)) if ids[i] in separators), len(ids))
        return TokenizedExample(ids[:end], [IGNORE_INDEX] * step_start + sequence.labels[step_start:end])

    return PreferenceExample(cut(chosen), cut(rejected), pair.prompt_length)


def preference_texts(rows: list[SourceRow]) -> list[str]:
    """Message contents of every row in either format (tokenizer training text for the tiny model)."""
    texts = []
    for source_row in rows:
        row = source_row.row if isinstance(source_row.row, dict) else {}
        for key in ("prompt", "chosen", "rejected"):
            value = row.get(key)
            if isinstance(value, str):
                texts.append(value)
            for message in value if isinstance(value, list) else []:
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    texts.append(message["content"])
    return texts


@dataclass
class PairBatch:
    """A micro-batch of B pairs as 2B sequences, chosen first: [chosen_1..chosen_B, rejected_1..rejected_B].

    `inputs` go to the model (input_ids, position_ids, [attention_mask,] targets), packed in one row
    [1, N] or padded [2B, T]. Flat indices address the flattened [1 * N] or [2B * T] token axis.
    """

    inputs: dict
    segment_ids: torch.Tensor  # shape of input_ids: which of the 2B sequences each token belongs to
    last_index: torch.Tensor  # [2B] flat index of each sequence's last token (its end of turn)
    prompt_index: torch.Tensor  # [2B] flat index of each sequence's last prompt token
    response_lengths: torch.Tensor  # [2B] labelled (response) tokens per sequence, float32

    @property
    def num_pairs(self) -> int:
        return self.last_index.shape[0] // 2

    def to(self, device) -> PairBatch:
        return PairBatch(
            {k: v.to(device) for k, v in self.inputs.items()},
            self.segment_ids.to(device),
            self.last_index.to(device),
            self.prompt_index.to(device),
            self.response_lengths.to(device),
        )


def pair_lengths(pair: PreferenceExample) -> tuple[int, int]:
    """(chosen, rejected) sequence lengths: what the pair puts in a forward (`collate_pairs`)."""
    return len(pair.chosen.input_ids), len(pair.rejected.input_ids)


def collate_pairs(pairs: list[PreferenceExample], packing: bool, pad_token_id: int) -> PairBatch:
    """Chosen and rejected of every pair in ONE batch, so one forward scores both (see `PairBatch`)."""
    sequences = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    prompt_lengths = torch.tensor([pair.prompt_length for pair in pairs] * 2)
    lengths = torch.tensor([len(sequence.input_ids) for sequence in sequences])
    inputs = collate(sequences, packing, pad_token_id)
    count = len(sequences)
    if packing:
        starts = torch.cumsum(lengths, 0) - lengths
        segment_ids = torch.repeat_interleave(torch.arange(count), lengths)[None, :]
    else:
        starts = torch.arange(count) * inputs["input_ids"].shape[1]
        segment_ids = torch.arange(count)[:, None].expand_as(inputs["input_ids"])
    response_lengths = torch.tensor([float(sequence.num_target_tokens) for sequence in sequences])
    return PairBatch(inputs, segment_ids, starts + lengths - 1, starts + prompt_lengths - 1, response_lengths)
