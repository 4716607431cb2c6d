"""Which attention kernel transformers runs: `model.attn_implementation`, with `auto` resolved here.

`auto` picks flash_attention_2 when the flash_attn package (version 2) imports and a CUDA GPU is present,
sdpa otherwise, and logs the choice. posttrain packs a micro-batch's sequences into one row whose position_ids
restart at 0 for each sequence (`posttrain.data.batching.collate_packed`) and passes no attention mask:
under flash_attention_2 transformers turns those position ids into the varlen kernel's cumulative sequence
lengths (padding-free, no N x N mask). Other kernels (sdpa, eager) would attend through an N x N block-diagonal
mask. Models that posttrain loads with sdpa run `PACKED_SDPA` instead (`use_packed_sdpa`): the decoder
keeps the packed row, and only attention splits it, one causal sdpa call per sequence (`packed_sdpa_attention`).
Elsewhere (eager, models built outside posttrain, unknown model types) `decoder_hidden_states` lays such a row out
as rows of its longest sequence first (`row_layout`), at the cost of the rows' padding in every layer.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger("posttrain")

AUTO = "auto"


def flash_attn_2_version() -> str | None:
    """The version of the importable flash_attn 2 package, or None (absent, broken build, or not version 2)."""
    try:
        module = importlib.import_module("flash_attn")
    except Exception:  # a wheel built for another torch / CUDA raises ImportError or OSError on import
        return None
    version = str(getattr(module, "__version__", ""))
    return version if version.startswith("2.") else None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_attn_implementation(requested: str) -> str:
    """`requested` as transformers' attn_implementation: `auto` becomes flash_attention_2 (flash_attn 2 imports
    and a CUDA GPU is present) or sdpa, logged; any other name passes through unchanged."""
    if requested != AUTO:
        return requested
    version, gpu = flash_attn_2_version(), cuda_available()
    if version and gpu:
        log.info("model.attn_implementation=auto: flash_attention_2 (flash_attn %s, CUDA GPU present)", version)
        return "flash_attention_2"
    reason = "no CUDA GPU" if not gpu else "the flash_attn 2 package does not import"
    log.info("model.attn_implementation=auto: sdpa (%s)", reason)
    return "sdpa"


# Kernels that take a packed row's sequence boundaries from position_ids and attend within each sequence
# only (varlen): one long row costs them nothing extra.
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")

# sdpa that also attends within each sequence of a packed row, given the row's `packed_sequence_lengths`.
PACKED_SDPA = "posttrain_packed_sdpa"
# Model types whose attention calls the registered attention function with the forward's kwargs (the
# transformers "functional" attention): they pass `packed_sequence_lengths` through to it.
PACKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# CPU sdpa (flash attention for CPU) runs its bf16 / fp16 backward 1.5-3x slower than its fp32 one on short sequences
# (forward + backward, 8 heads of 64, 2 threads: 16 queries over 34 keys 0.83 vs 0.47 ms, 64 over 82 1.94 vs 1.33 ms,
# 128 over 146 4.1 vs 2.8 ms; causal 256: 4.4 vs 4.1 ms, 512: 13.9 vs 16.2 ms). `attend` runs such calls in fp32 up to
# this many keys (the casts included): RLVR's per-completion calls, short packed sequences.
UPCAST_MAX_KEYS = 256


def attend(module, query, key, value, attention_mask, **kwargs):
    """sdpa_attention_forward; on CPU, for a bf16 / fp16 query that needs a gradient and at most UPCAST_MAX_KEYS
    keys, computed in float32 and the output cast back (more exact, and faster there: see UPCAST_MAX_KEYS)."""
    dtype = query.dtype
    if (
        query.device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and query.requires_grad
        and torch.is_grad_enabled()
        and key.shape[2] <= UPCAST_MAX_KEYS
    ):
        output, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
        return output.to(dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def packed_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    packed_sequence_lengths=None,
    packed_prompt_groups=None,
    **kwargs,
):
    """transformers' sdpa attention (query [B, heads, T, d], key / value [B, kv heads, T, d] -> [B, T, heads, d]),
    and with `packed_sequence_lengths` (a list summing to T, B = 1, no mask) one causal sdpa call per sequence of
    the packed row, outputs concatenated: no N x N mask, no padding, attention work sum(L^2) instead of N^2.
    With `packed_prompt_groups` instead, the row holds prompts shared by several completions
    (`shared_prompt_attention`). Scaling, dropout and grouped-query heads are sdpa_attention_forward's own, call
    by call."""
    if packed_sequence_lengths is None and packed_prompt_groups is None:
        return attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    total = sum(packed_sequence_lengths) if packed_prompt_groups is None else prompt_groups_length(packed_prompt_groups)
    if attention_mask is not None or query.shape[0] != 1 or total != query.shape[2]:
        raise ValueError(
            f"packed_sequence_lengths or packed_prompt_groups (covering {total} positions) describe one packed row "
            f"without an attention mask; got query {tuple(query.shape)} and a mask: {attention_mask is not None}"
        )
    kwargs.pop("is_causal", None)
    if packed_prompt_groups is not None:
        return shared_prompt_attention(module, query, key, value, packed_prompt_groups, dropout, scaling, **kwargs)
    outputs = [
        attend(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
        for q, k, v in zip(
            query.split(packed_sequence_lengths, 2),
            key.split(packed_sequence_lengths, 2),
            value.split(packed_sequence_lengths, 2),
        )
    ]
    return torch.cat(outputs, 1), None


def prompt_groups_length(groups) -> int:
    """Positions a packed row of `groups` ((prompt length, completion lengths) each) holds: every prompt once."""
    return sum(prompt + sum(completions) for prompt, completions in groups)


def shared_prompt_attention(module, query, key, value, groups, dropout, scaling, **kwargs):
    """Causal attention over a packed row laid out as `groups`: for each (prompt length P, completion lengths
    L_1..L_G), the prompt's P positions once, then each completion's L_i positions, which attend to the prompt
    and to their own completion only (what they would see in the sequence prompt + completion i).

    Per group, one causal sdpa call over the prompt, then one per completion: its L_i queries over the prompt's
    keys and values followed by its own, under a causal mask aligned to the bottom right (query t sees the
    prompt and its completion up to t). The prompt's keys and values are shared by the G calls (their gradients
    add up); no prompt query is computed twice. Everything outside attention (projections, MLP, norms, the head)
    runs on the prompt once. The row is cut with `split`, whose backward is one concatenation (slicing it per
    piece would zero-fill a gradient of the whole row for every piece)."""
    segments = [length for prompt, completions in groups for length in (prompt, *completions)]
    queries, keys, values = (t.split(segments, 2) for t in (query, key, value))
    outputs, index, masks = [], 0, {}
    for prompt, completions in groups:
        k_prompt, v_prompt = keys[index], values[index]
        outputs.append(
            attend(
                module, queries[index], k_prompt, v_prompt, None, dropout=dropout, scaling=scaling, is_causal=True,
                **kwargs,
            )[0]
        )  # fmt: skip
        index += 1
        for length in completions:
            if length == 0:  # nothing attends; the split gave it an empty piece
                index += 1
                continue
            if (prompt, length) not in masks:
                visible = torch.ones(length, prompt + length, dtype=torch.bool, device=query.device)
                masks[prompt, length] = visible.tril(diagonal=prompt)[None, None]
            output = attend(
                module,
                queries[index],
                torch.cat([k_prompt, keys[index]], 2),
                torch.cat([v_prompt, values[index]], 2),
                masks[prompt, length],
                dropout=dropout,
                scaling=scaling,
                is_causal=False,
                **kwargs,
            )[0]
            outputs.append(output)
            index += 1
    return torch.cat(outputs, 1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # without packed_sequence_lengths it is plain sdpa


def use_packed_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """`model` switched from sdpa to `PACKED_SDPA` when its type is known to pass the forward's kwargs to its
    attention function (`PACKED_MODEL_TYPES`); any other model unchanged. Returns the model."""
    config = model.config
    if config._attn_implementation == "sdpa" and getattr(config, "model_type", None) in PACKED_MODEL_TYPES:
        model.set_attn_implementation(PACKED_SDPA)
    return model


@dataclass(frozen=True)
class RowLayout:
    """Where the tokens of one packed row [1, N] go when it is laid out as rows [R, C] instead.

    index [R, C]: the packed position each row slot reads (-1: padding); flat [N]: each packed position's slot in
    the flattened [R * C] rows. capacity C is the longest sequence, so no sequence is split."""

    index: torch.Tensor
    flat: torch.Tensor

    @property
    def rows(self) -> int:
        return self.index.shape[0]


def sequence_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the sequences packed in one row [N] of position ids: a sequence starts wherever the position
    does not continue the previous one (the rule transformers applies to build its block mask)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[1:] = position_ids[1:] != position_ids[:-1] + 1
    bounds = torch.nonzero(starts).flatten().tolist() + [position_ids.numel()]
    return [end - start for start, end in zip(bounds[:-1], bounds[1:])]


def layer_cost(tokens: int, attended: int, hidden_size: int) -> int:
    """Forward FLOPs of one decoder layer over `tokens` tokens that each attend to `attended` positions, in units
    of 4 x hidden: ~24 h^2 per token in the projections and MLP, 4 h per attended position (QK^T and AV; a
    masked kernel computes the whole row, masked or not)."""
    return tokens * (6 * hidden_size + attended)


def row_layout(position_ids: torch.Tensor, hidden_size: int) -> RowLayout | None:
    """First-fit-decreasing layout of the sequences of a packed row `position_ids` [1, N] into rows of capacity
    C = the longest sequence; None when it would not cost less (`layer_cost`: N x N attention in one row
    against R x C x C in rows, plus the rows' padding in every projection).

    Why: without a varlen kernel (sdpa, eager), transformers attends a packed row through an N x N block-diagonal
    mask, so attention costs N^2 however short the sequences are; in rows of C it costs at most N * C, and the
    padding is the slack first-fit-decreasing leaves (a few percent on mixed lengths)."""
    lengths = sequence_lengths(position_ids[0])
    capacity, total = max(lengths), position_ids.shape[1]
    if len(lengths) < 2:
        return None
    starts = [0]
    for length in lengths[:-1]:
        starts.append(starts[-1] + length)
    rows: list[list[int]] = []  # sequence ids per row
    room: list[int] = []
    for sequence in sorted(range(len(lengths)), key=lambda s: -lengths[s]):
        row = next((r for r, free in enumerate(room) if free >= lengths[sequence]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(sequence)
        room[row] -= lengths[sequence]
    if layer_cost(len(rows) * capacity, capacity, hidden_size) >= layer_cost(total, total, hidden_size):
        return None
    index = torch.full((len(rows), capacity), -1, dtype=torch.long)
    for row, sequences in enumerate(rows):
        slots = torch.cat([torch.arange(starts[s], starts[s] + lengths[s]) for s in sequences])
        index[row, : slots.numel()] = slots
    flat = torch.empty(total, dtype=torch.long)
    real = index.flatten() >= 0
    flat[index.flatten()[real]] = torch.nonzero(real).flatten()
    return RowLayout(index, flat)


def to_rows(layout: RowLayout, input_ids: torch.Tensor, position_ids: torch.Tensor):
    """(input_ids, position_ids) [R, C] of the laid-out rows. A row's padding tail takes token 0 and positions
    restarting at 0: a sequence of its own, which causal attention keeps out of every real token's view."""
    real = layout.index >= 0
    slots = layout.index.clamp(min=0)
    ids = torch.where(real, input_ids[0][slots], torch.zeros_like(slots))
    pad_positions = (~real).long().cumsum(-1) - 1
    positions = torch.where(real, position_ids[0][slots], pad_positions)
    return ids, positions


def shares_prompts(config) -> bool:
    """Whether a model with this config attends through `packed_prompt_groups` (`shared_prompt_attention`)."""
    return getattr(config, "_attn_implementation", None) == PACKED_SDPA


def split_attention_states(decoder, input_ids, position_ids, **boundaries) -> torch.Tensor:
    """The decoder's final states for one packed row under `PACKED_SDPA`, the row's layout passed to attention as
    `boundaries` (packed_sequence_lengths or packed_prompt_groups). An all-ones 2D mask keeps transformers from
    building the N x N block mask of the packed row (it then relies on is_causal)."""
    output = decoder(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=torch.ones_like(input_ids),
        use_cache=False,
        **boundaries,
    )
    return output.last_hidden_state


def decoder_hidden_states(
    decoder, input_ids, position_ids=None, attention_mask=None, prompt_groups=None
) -> torch.Tensor:
    """The decoder's final hidden states [B, T, H] for `input_ids` [B, T]. A packed row ([1, N], restarting
    position_ids, no mask) under a kernel without varlen support runs as rows of its longest sequence
    (`row_layout`), or under `PACKED_SDPA` as the one row with attention split per sequence; the states come back
    in packed order, so the caller cannot tell. `prompt_groups` ((prompt length, completion lengths) each, in
    row order; `PACKED_SDPA` only, see `shares_prompts`): the row holds each prompt once, followed by its
    completions, whose position_ids continue the prompt's (`shared_prompt_attention`)."""
    layout = None
    implementation = getattr(decoder.config, "_attn_implementation", None)
    if prompt_groups is not None:
        if implementation != PACKED_SDPA or input_ids.shape[0] != 1 or attention_mask is not None:
            raise ValueError(
                f"prompt_groups need one packed row [1, N] without a mask under {PACKED_SDPA}; got input_ids "
                f"{tuple(input_ids.shape)}, attention {implementation}, a mask: {attention_mask is not None}"
            )
        return split_attention_states(decoder, input_ids, position_ids, packed_prompt_groups=prompt_groups)
    packed = (
        attention_mask is None
        and position_ids is not None
        and input_ids.shape[0] == 1
        and implementation not in VARLEN_IMPLEMENTATIONS
    )
    if packed and implementation == PACKED_SDPA:
        lengths = sequence_lengths(position_ids[0].cpu())
        if len(lengths) > 1:
            return split_attention_states(decoder, input_ids, position_ids, packed_sequence_lengths=lengths)
    elif packed:
        layout = row_layout(position_ids.cpu(), getattr(decoder.config, "hidden_size", 0))
    if layout is None:
        # use_cache=False is load-bearing: transformers builds the block-diagonal mask of packed rows from
        # restarting position_ids only when there is no KV cache.
        output = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        return output.last_hidden_state
    device = input_ids.device
    layout = RowLayout(layout.index.to(device), layout.flat.to(device))
    ids, positions = to_rows(layout, input_ids, position_ids)
    hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.flat).unsqueeze(0)
