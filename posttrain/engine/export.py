"""Full (gathered, LoRA-merged) weights of the policy: for `final/` export and rollout weight sync."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from posttrain.engine.distributed import barrier, is_main_process
from posttrain.models.logprob_model import base_causal_lm


@contextlib.contextmanager
def gathered_parameters(module: nn.Module, zero_stage: int, modifier_rank: int | None = None):
    """Inside, every parameter of `module` is whole on every rank (ZeRO-3 gathers; else a no-op). Writes made
    inside survive only with `modifier_rank` set: that rank's values are broadcast and re-partitioned on exit
    (with None, DeepSpeed discards them)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
            yield
    else:
        yield


def merged_lora_state_dict(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain transformers state dict of `peft_model` with weights `state`, adapters merged in.

    A fresh copy of the architecture is built on the meta device and the weights assigned into it, so
    the training model (possibly ZeRO-partitioned) is never modified.
    """
    from peft import get_peft_model

    base = base_causal_lm(peft_model)
    with torch.device("meta"):
        fresh = type(base)(base.config)
        fresh = get_peft_model(fresh, peft_model.peft_config["default"])
    fresh.load_state_dict(state, assign=True, strict=True)
    return {name: tensor.detach() for name, tensor in fresh.merge_and_unload().state_dict().items()}


def hf_state_dict(policy: nn.Module, zero_stage: int, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
    """Full transformers-named weights of `policy` (LoRA merged) on CPU; None on ranks > 0 unless `all_ranks`."""
    state = None
    with gathered_parameters(policy, zero_stage):
        if all_ranks or is_main_process():
            state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in policy.state_dict().items()}
    if state is not None and hasattr(policy, "peft_config"):
        state = merged_lora_state_dict(policy, state)
    return state


def export_hf(policy: nn.Module, tokenizer, out_dir: Path, zero_stage: int) -> None:
    """Write a Hugging Face directory (safetensors + config + tokenizer + chat template), atomically."""
    state = hf_state_dict(policy, zero_stage)
    if is_main_process():
        out_dir = Path(out_dir)
        staging = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(staging, ignore_errors=True)
        base = base_causal_lm(policy)
        base.save_pretrained(str(staging), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    barrier()
