"""The frozen reference of the DPO family, as the trainer consumes it: cached sums per split, a live model, or none.

The cache itself (key, computation, on-disk file) is `posttrain.engine.reference`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from posttrain.engine.backend import zero3_load_config
from posttrain.engine.distributed import is_main_process
from posttrain.engine.export import gathered_parameters, hf_state_dict
from posttrain.engine.reference import (
    ReferenceLogprobs,
    cached_reference_logprobs,
    compute_reference_logprobs,
    default_cache_dir,
    frozen_model,
    model_fingerprint,
    reference_cache_key,
)
from posttrain.models.loading import load_model
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.logprobs import completion_logprob_rows, pair_logprob_sums

log = logging.getLogger("posttrain")

REFERENCE_FREE_LOSSES = frozenset({"simpo"})


@dataclass
class PairReference:
    """Where reference log-probs come from: cached per split, a live frozen model, or nowhere (simpo)."""

    train: ReferenceLogprobs | None = None
    eval: ReferenceLogprobs | None = None
    live: torch.nn.Module | None = None
    cache_hits: int = 0

    def sums(self, split: str, indices: list[int], batch, device):
        """(chosen [B], rejected [B]) reference sums of pairs `indices` of `split` (None, None: reference-free)."""
        cached = self.train if split == "train" else self.eval
        if cached is not None:
            return cached.take(indices, device)
        if self.live is not None:
            with torch.no_grad():
                return pair_logprob_sums(self.live, batch)
        return None, None


def reference_model(cfg, tokenizer) -> torch.nn.Module:
    """The frozen reference: `algo.reference.path`, else the policy's starting point."""
    return frozen_model_at(cfg, cfg.algo.reference.path or cfg.model.path, tokenizer)


def frozen_model_at(cfg, path: str | None, tokenizer) -> torch.nn.Module:
    """A frozen model (reference, distillation teacher or oracle) from `path` (null: the tiny model of
    `model.tiny`, seeded by `seed`), with `model.*`'s dtype and kernels, wrapped for log-probs and placed by
    `frozen_model` (ZeRO-3: partitioned by an optimizer-free DeepSpeed engine)."""
    model_cfg = OmegaConf.merge(cfg.model, {"path": path, "gradient_checkpointing": False})
    model = load_model(model_cfg, tokenizer, cfg.seed, zero3_load_config(cfg))
    module = CausalLMWithLogprobs(model, fused=cfg.model.fused_logprobs, zero_stage=cfg.deepspeed.zero_stage)
    return frozen_model(module, cfg.deepspeed.zero_stage, cfg.model.dtype, cfg.deepspeed.offload_params)


def build_pair_reference(cfg, tokenizer, splits: dict[str, list]) -> PairReference:
    """Reference log-probs per `algo.reference` for the pairs of each split: cached (the model is loaded only on
    a cache miss and freed after), live (`cache: false`), or none (a reference-free loss)."""
    if cfg.algo.loss in REFERENCE_FREE_LOSSES:
        log.info("%s is reference-free: no reference model", cfg.algo.loss)
        return PairReference()
    if not cfg.algo.reference.cache:
        return PairReference(live=reference_model(cfg, tokenizer))
    ref_cfg = cfg.algo.reference
    identity = model_fingerprint(ref_cfg.path or cfg.model.path, OmegaConf.to_container(cfg.model.tiny), cfg.seed)
    cache_dir = Path(ref_cfg.cache_dir) if ref_cfg.cache_dir else default_cache_dir()
    loaded: list[torch.nn.Module] = []

    def compute(examples):
        if not loaded:
            loaded.append(reference_model(cfg, tokenizer))
        device = next(iter(loaded[0].parameters())).device
        return compute_reference_logprobs(
            loaded[0], examples, ref_cfg.micro_batch_size, cfg.data.packing, tokenizer.pad_token_id, device,
            max_tokens=cfg.train.max_tokens_per_micro_batch,
        )  # fmt: skip

    reference = PairReference()
    for split, examples in splits.items():
        if not examples:
            continue
        key = reference_cache_key(
            model=identity, examples=examples, tokenizer=tokenizer, max_length=cfg.data.max_length,
            truncation=cfg.data.truncation, dtype=cfg.model.dtype, fused=cfg.model.fused_logprobs,
        )  # fmt: skip
        logprobs, hit = cached_reference_logprobs(key, cache_dir, len(examples), lambda pairs=examples: compute(pairs))
        setattr(reference, split, logprobs)
        reference.cache_hits += int(hit)
    loaded.clear()  # free the reference model before the policy is built
    gc.collect()
    return reference


REFERENCE_WEIGHTS = "reference.safetensors"  # in a checkpoint: the reference as last refreshed


def refresh_reference(reference: torch.nn.Module, policy: torch.nn.Module, zero_stage: int) -> None:
    """Copy the policy's current weights into the frozen reference (T1's "dynamic anchor"). Collective: every
    rank calls it. Under ZeRO-3 the policy is gathered whole and rank 0 alone writes it (`load_reference_weights`)."""
    state = hf_state_dict(policy, zero_stage, all_ranks=zero_stage != 3)
    load_reference_weights(reference, state, zero_stage)


def load_reference_weights(reference: torch.nn.Module, state: dict[str, torch.Tensor] | None, zero_stage: int):
    """Write transformers-named weights `state` into the frozen `reference` (a `frozen_model`). Collective. Under
    ZeRO-3 rank 0's `state` is written into the gathered reference and DeepSpeed broadcasts and re-partitions it
    on exit (modifier_rank=0; writes under modifier_rank=None are discarded), other ranks pass None; otherwise
    every rank holds a whole copy and passes its `state`."""
    target = reference.module if hasattr(reference, "module") else reference
    with gathered_parameters(target.policy, zero_stage, modifier_rank=0):
        if state is not None:
            target.policy.load_state_dict(state)


def save_reference_weights(reference: torch.nn.Module, directory: Path, zero_stage: int) -> None:
    """Write the frozen `reference`'s weights to `directory`/reference.safetensors (rank 0; collective)."""
    from safetensors.torch import save_file

    target = reference.module if hasattr(reference, "module") else reference
    state = hf_state_dict(target.policy, zero_stage)
    if state is not None:
        save_file(state, str(Path(directory) / REFERENCE_WEIGHTS))


def restore_reference_weights(reference: torch.nn.Module, checkpoint: Path, zero_stage: int) -> bool:
    """Load the refreshed reference a checkpoint holds (`save_reference_weights`) into `reference`; False, and
    nothing changed, when it holds none (no refresh had happened). Collective."""
    file = Path(checkpoint) / REFERENCE_WEIGHTS
    if not file.exists():
        return False
    from safetensors.torch import load_file

    reads = zero_stage != 3 or is_main_process()  # under ZeRO-3 rank 0 alone writes (load_reference_weights)
    load_reference_weights(reference, load_file(str(file)) if reads else None, zero_stage)
    log.info("reference restored from %s (refreshed before the checkpoint)", file)
    return True


def reference_logprob_rows(
    reference,
    policy_engine,
    examples,
    prompt_lengths,
    micro_batch_size,
    temperature,
    max_tokens=None,
    share_prompts=False,
):
    """Per-token reference log-probs of each completion (`completion_logprob_rows`, `max_tokens` tokens a forward
    when set, each prompt once a forward with `share_prompts`): from the frozen `reference`, or, when it is None
    (LoRA), from the policy with its adapters switched off (the base model is the reference)."""
    model = reference if reference is not None else policy_engine
    with contextlib.nullcontext() if reference is not None else policy_engine.module.policy.disable_adapter():
        return completion_logprob_rows(
            model, examples, prompt_lengths, micro_batch_size, temperature, max_tokens, share_prompts
        )
