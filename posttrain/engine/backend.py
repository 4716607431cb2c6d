"""The DeepSpeed backend: one engine for every trainer, ZeRO stages 0-3 with optional offload.

Loss scaling is posttrain's, not DeepSpeed's: trainers pass losses already normalised over the whole
optimizer step (see `posttrain.losses.sft`), so `backward` is called with scale_wrt_gas=False.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from posttrain.engine.distributed import world_size
from posttrain.engine.schedule import build_scheduler
from posttrain.errors import ConfigError

log = logging.getLogger("posttrain")


def world_size_mismatch(train_cfg, world: int) -> str | None:
    """A warning when `train.assumed_world_size` (the ranks a recipe's batch was written for) is not `world`:
    the effective batch then differs from the recipe's; the message names the accumulation that restores it."""
    assumed = train_cfg.assumed_world_size
    if assumed is None or assumed == world:
        return None
    micro, accum = train_cfg.micro_batch_size, train_cfg.gradient_accumulation_steps
    intended = micro * accum * assumed
    message = (
        f"the batch settings assume {assumed} ranks (effective batch {micro} x {accum} x {assumed} = {intended}); "
        f"this run has {world}: effective batch {micro * accum * world}"
    )
    if intended % (micro * world) == 0:
        message += f"; train.gradient_accumulation_steps={intended // (micro * world)} restores {intended}"
    return message


def deepspeed_config(ds_cfg, train_cfg, optim_cfg, dtype: str) -> dict[str, Any]:
    """The DeepSpeed JSON config for `deepspeed.*`, `train.*` and `optim.*`."""
    if ds_cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={ds_cfg.zero_stage} must be 0, 1, 2 or 3")
    mismatch = world_size_mismatch(train_cfg, world_size())
    if mismatch:
        log.warning(mismatch)
    zero: dict[str, Any] = {"stage": ds_cfg.zero_stage}
    if ds_cfg.zero_stage == 3:
        # Keep every parameter gathered-on-demand; collect the full 16-bit weights on save.
        zero.update({"stage3_gather_16bit_weights_on_model_save": True})
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds_cfg.offload_params:
        if ds_cfg.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": train_cfg.gradient_accumulation_steps,
        "train_batch_size": train_cfg.micro_batch_size * train_cfg.gradient_accumulation_steps * world_size(),
        "gradient_clipping": 0.0 if clips_outside_deepspeed(ds_cfg.zero_stage, dtype) else optim_cfg.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    config.update(dict(ds_cfg.overrides))
    return config


def zero3_load_config(cfg) -> dict | None:
    """The DeepSpeed config models are created under (`sharded_init`): ZeRO-3 with model.sharded_init, else None."""
    if cfg.deepspeed.zero_stage != 3 or not cfg.model.sharded_init:
        return None
    return deepspeed_config(cfg.deepspeed, cfg.train, cfg.optim, cfg.model.dtype)


def clips_outside_deepspeed(zero_stage: int, dtype: str) -> bool:
    """True where DeepSpeed clips (ZeRO-0, fp32) but throws the gradient norm away: posttrain clips then."""
    return zero_stage == 0 and dtype == "float32"


def build_optimizer(parameters, optim_cfg, offload: bool) -> torch.optim.Optimizer:
    """AdamW; DeepSpeedCPUAdam when the optimizer state is offloaded to CPU on a GPU machine."""
    kwargs = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    if offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(parameters, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def build_engine(module: torch.nn.Module, cfg, total_steps: int):
    """A DeepSpeed engine training `module`'s trainable parameters with AdamW and the lr schedule."""
    import deepspeed

    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError("the model has no trainable parameters")
    optimizer = build_optimizer(parameters, cfg.optim, cfg.deepspeed.offload_optimizer)
    scheduler = build_scheduler(optimizer, total_steps, cfg.optim.warmup_ratio, cfg.optim.scheduler)
    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg.deepspeed, cfg.train, cfg.optim, cfg.model.dtype),
    )
    return engine


def step(engine, max_grad_norm: float) -> None:
    """`engine.step()` after a micro-batch's backward; at the accumulation boundary the gradients are
    clipped to `max_grad_norm` (by DeepSpeed, or here where DeepSpeed would not report the norm)."""
    if engine.is_gradient_accumulation_boundary() and engine.gradient_clipping() == 0.0:
        parameters = [p for p in engine.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf"))
        engine.posttrain_grad_norm = float(norm)
    engine.step()


def grad_norm(engine) -> float:
    """The gradient norm (before clipping) of the last optimizer step."""
    if hasattr(engine, "posttrain_grad_norm"):
        return engine.posttrain_grad_norm
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])
