"""The trainer's current weights as (transformers name, tensor) pairs, for `RolloutService.sync_weights`.

Accepted models: a transformers CausalLM, a PEFT model, `CausalLMWithLogprobs` around either, or the
DeepSpeed engine training one of those (any ZeRO stage). Under ZeRO-3 the weights are gathered from
all ranks, so every rank must call this at the same point (each engine rank then takes what it needs).

Memory: weights stream in buckets of at most `bucket_bytes` (rollout.sync_bucket_mb): under ZeRO-3 one
bucket of parameters is gathered, copied out and released before the next, so the extra memory is at most two
buckets, never a second copy of the model. A parameter larger than the bucket is assembled from the ranks'
partitions a bucket at a time straight into the one copy the receiver takes (`assembled_from_partitions`):
its extra is that copy plus a bucket, where gathering it whole and copying it out held two copies. (Receivers take
whole tensors: vLLM's weight loaders shard or repack a full checkpoint tensor, so one full copy of the largest
tensor is the floor on this path.) Plain (unpartitioned) weights are handed out as they are.
LoRA models stream merged weights (W + scaling * B @ A) bucket by bucket, or, for engines that take
adapters, only the adapter (`lora_adapter_state`), a few MB whatever the model size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from posttrain.models.logprob_model import CausalLMWithLogprobs

NamedTensors = Iterator[tuple[str, torch.Tensor]]

DEFAULT_BUCKET_BYTES = 256 << 20


def unwrap_policy(model: nn.Module) -> nn.Module:
    """The transformers / PEFT model inside a DeepSpeed engine and / or `CausalLMWithLogprobs`."""
    if hasattr(model, "zero_optimization_stage") and hasattr(model, "module"):  # a DeepSpeedEngine
        model = model.module
    if isinstance(model, CausalLMWithLogprobs):
        model = model.policy
    return model


def is_lora(model: nn.Module) -> bool:
    return hasattr(unwrap_policy(model), "peft_config")


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")  # DeepSpeed tags every ZeRO-3 managed parameter with its id


def full_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the whole tensor (a ZeRO-3 parameter's full size, not its local partition)."""
    numel = getattr(tensor, "ds_numel", None) if is_zero3_partitioned(tensor) else None
    return (numel if numel is not None else tensor.numel()) * tensor.element_size()


def buckets(entries: Sequence, bucket_bytes: int, size=lambda entry: full_bytes(entry[1])) -> Iterator[list]:
    """Consecutive runs of `entries` of at most `bucket_bytes` each (an entry larger than that is alone)."""
    bucket, used = [], 0
    for entry in entries:
        entry_bytes = size(entry)
        if bucket and used + entry_bytes > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append(entry)
        used += entry_bytes
    if bucket:
        yield bucket


def gathered(tensors: Sequence[torch.Tensor]):
    """Inside, the ZeRO-3 partitioned `tensors` are whole on every rank (one collective); else a no-op."""
    partitioned = [tensor for tensor in tensors if is_zero3_partitioned(tensor)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def handed_out(tensor: torch.Tensor) -> torch.Tensor:
    """A gathered ZeRO-3 tensor is freed when its bucket is released: the receiver gets a copy of it."""
    return tensor.detach().clone() if is_zero3_partitioned(tensor) else tensor.detach()


def has_flat_partition(tensor: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose local partition is in memory as a flat tensor (`ds_tensor`), not swapped to NVMe."""
    partition = getattr(tensor, "ds_tensor", None)
    return (
        partition is not None
        and getattr(partition, "ds_numel", None) is not None
        and partition.numel() >= partition.ds_numel
        and getattr(tensor, "ds_process_group", None) is not None
    )


def assembled_from_partitions(param: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """A full copy of the ZeRO-3 parameter `param`, all-gathered from its ranks' flat partitions straight into it,
    `chunk_bytes` (over all ranks) at a time. A collective over `param.ds_process_group`.

    DeepSpeed lays a parameter out as its flattened elements padded to ranks x p and gives rank r elements
    r * p .. (r + 1) * p - 1 (`param.ds_tensor`, p = `ds_tensor.ds_numel`). Unlike GatheredParameters followed by
    a copy for the receiver (two full tensors at once), the extra memory is the copy (padded by < ranks elements)
    plus the collective's staging of one chunk: the parameter itself stays partitioned."""
    import torch.distributed as dist

    group = param.ds_process_group
    ranks = dist.get_world_size(group)
    partition, per_rank = param.ds_tensor.detach(), param.ds_tensor.ds_numel
    flat = torch.empty(ranks * per_rank, dtype=partition.dtype, device=partition.device)
    step = max(1, chunk_bytes // (partition.element_size() * ranks))
    for start in range(0, per_rank, step):
        count = min(step, per_rank - start)
        outputs = [flat.narrow(0, rank * per_rank + start, count) for rank in range(ranks)]
        dist.all_gather(outputs, partition.narrow(0, start, count), group=group)
    return flat.narrow(0, 0, param.ds_numel).view(param.ds_shape)


def whole_tensors(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> Iterator[tuple[torch.Tensor, bool]]:
    """Each of one bucket's `tensors` whole, with whether the caller owns it (may change it in place).

    Under ZeRO-3 a collective. A partitioned tensor larger than the bucket (alone in it) is assembled from the
    ranks' partitions a bucket at a time (`assembled_from_partitions`): its extra memory is one copy of it plus a
    bucket, not two copies. Smaller ones are gathered together (one GatheredParameters) and copied out: at most
    two buckets. Unpartitioned tensors come as they are (not owned)."""
    only = tensors[0] if len(tensors) == 1 else None
    if only is not None and is_zero3_partitioned(only) and full_bytes(only) > bucket_bytes and has_flat_partition(only):
        yield assembled_from_partitions(only, bucket_bytes), True
        return
    with gathered(tensors):
        for tensor in tensors:
            yield handed_out(tensor), is_zero3_partitioned(tensor)


def streamed_weights(module: nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> NamedTensors:
    """Every `module.state_dict()` entry, ZeRO-3 parameters gathered a bucket at a time (`whole_tensors`)."""
    for bucket in buckets(list(module.state_dict(keep_vars=True).items()), bucket_bytes):
        whole = whole_tensors([tensor for _, tensor in bucket], bucket_bytes)
        for (name, _), (tensor, _) in zip(bucket, whole):
            yield name, tensor


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers of `peft_model` by their module name in its base model."""
    from peft.tuners.lora import LoraLayer

    modules = peft_model.get_base_model().named_modules()
    return {name: module for name, module in modules if isinstance(module, LoraLayer)}


def transformers_name(peft_name: str) -> str | None:
    """The transformers name of a base-model state-dict entry of a LoRA model, None for adapter weights."""
    if ".lora_" in peft_name or ".original_module." in peft_name:
        return None
    return peft_name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def merged_lora_weights(peft_model: nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> NamedTensors:
    """Transformers-named weights of a PEFT LoRA model with every adapter merged (W + scaling * B @ A), computed
    a bucket at a time: the model is not modified and no merged copy of the whole model is held."""
    layers = lora_layers(peft_model)
    adapter = peft_model.active_adapter
    entries = []
    for name, tensor in peft_model.get_base_model().state_dict(keep_vars=True).items():
        target = transformers_name(name)
        if target is not None:
            owner = name.rsplit(".", 1)[0].removesuffix(".base_layer")
            layer = layers.get(owner) if name.endswith(".base_layer.weight") else None
            entries.append((target, tensor, layer))
    for bucket in buckets(entries, bucket_bytes, size=lambda entry: full_bytes(entry[1])):
        adapters = [p for _, _, layer in bucket if layer is not None for p in lora_parameters(layer, adapter)]
        with gathered(adapters):  # small; the bucket's base weights come whole from `whole_tensors`
            for (target, _, layer), (tensor, owned) in zip(
                bucket, whole_tensors([t for _, t, _ in bucket], bucket_bytes)
            ):
                if layer is None or adapter not in layer.lora_A:
                    yield target, tensor
                else:
                    delta = layer.get_delta_weight(adapter).to(tensor.dtype)
                    yield target, tensor.add_(delta) if owned else tensor + delta


def lora_parameters(layer: nn.Module, adapter: str) -> list[torch.Tensor]:
    if adapter not in layer.lora_A:
        return []
    return [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]


def lora_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active LoRA adapter's weights in PEFT's saved format (`get_peft_model_state_dict`: names such as
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight), on CPU; a collective under ZeRO-3."""
    from peft import get_peft_model_state_dict

    policy = unwrap_policy(model)
    adapters = [p for layer in lora_layers(policy).values() for p in lora_parameters(layer, policy.active_adapter)]
    with gathered(adapters):
        state = get_peft_model_state_dict(policy, adapter_name=policy.active_adapter)
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def policy_weights(model: nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> NamedTensors:
    """Transformers-named full weights of `model` (LoRA merged); a collective under ZeRO-3 (see module doc)."""
    policy = unwrap_policy(model)
    if hasattr(policy, "peft_config"):
        yield from merged_lora_weights(policy, bucket_bytes)
    else:
        yield from streamed_weights(policy, bucket_bytes)
