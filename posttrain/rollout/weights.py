"""The trainer's current weights as (transformers name, tensor) pairs, for `RolloutService.sync_weights`.

Accepted models: a transformers CausalLM, a PEFT model, `CausalLMWithLogprobs` around either, or the
DeepSpeed engine training one of those (any ZeRO stage). Under ZeRO-3 the weights are gathered from
all ranks, so every rank must call this at the same point, and every rank gets the full weights (each
rank owns a rollout engine). Plain models stream one parameter at a time (a ZeRO-3 parameter is
gathered, copied and released before the next), so no full second copy of the model is ever held;
PEFT models go through `posttrain.engine.export.hf_state_dict`, which gathers everything once and
merges the LoRA adapters into the base weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from posttrain.engine.export import hf_state_dict
from posttrain.models.logprob_model import CausalLMWithLogprobs

NamedTensors = Iterator[tuple[str, torch.Tensor]]


def unwrap_policy(model: nn.Module) -> nn.Module:
    """The transformers / PEFT model inside a DeepSpeed engine and / or `CausalLMWithLogprobs`."""
    if hasattr(model, "zero_optimization_stage") and hasattr(model, "module"):  # a DeepSpeedEngine
        model = model.module
    if isinstance(model, CausalLMWithLogprobs):
        model = model.policy
    return model


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")  # DeepSpeed tags every ZeRO-3 managed parameter with its id


def _gathered(tensor: torch.Tensor):
    if not is_zero3_partitioned(tensor):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)


def streamed_weights(module: nn.Module) -> NamedTensors:
    """Every `module.state_dict()` entry, ZeRO-3 parameters gathered one at a time (and copied out)."""
    for name, tensor in module.state_dict(keep_vars=True).items():
        with _gathered(tensor):
            value = tensor.detach()
            yield name, value.clone() if is_zero3_partitioned(tensor) else value


def policy_weights(model: nn.Module) -> NamedTensors:
    """Transformers-named full weights of `model` (LoRA merged); a collective under ZeRO-3 (see module doc)."""
    policy = unwrap_policy(model)
    if hasattr(policy, "peft_config"):
        zero_stage = 3 if any(is_zero3_partitioned(p) for p in policy.parameters()) else 0
        yield from hf_state_dict(policy, zero_stage, all_ranks=True).items()
    else:
        yield from streamed_weights(policy)
