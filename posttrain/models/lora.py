"""LoRA wrapping with PEFT."""

from __future__ import annotations

from torch import nn


def wrap_lora(model: nn.Module, peft_cfg, task_type: str | None = "CAUSAL_LM") -> nn.Module:
    """The model with LoRA adapters on `peft.target_modules`; only adapter weights stay trainable.
    `task_type` None gives PEFT's plain wrapper (a reward model's decoder + head, whose head the caller unfreezes)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=list(peft_cfg.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, config)
