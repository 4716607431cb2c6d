"""`RolloutService`: the one way every sampler in posttrain (RLVR, GPO, on-policy data, evals) samples the policy.

    service = build_rollout_service(cfg.rollout, model_dir, tokenizer)   # on every rank, together
    completions = service.generate(prompts, SamplingConfig(n=4, temperature=1.0, max_tokens=256))
    ... train ...
    service.sync_weights(engine)   # a collective under ZeRO-3: every rank calls it

or, with the engine asleep while the trainer uses its memory (rollout.enable_sleep_mode):

    with service.released(sync_from=engine):   # sleep at rollout.sleep_level; on exit wake the weights, sync
        ... train ...                           # the KV cache comes back at the next generate

The backend (`vllm` or `hf`) is picked by `rollout.backend` from a registry; both return the same
`Completion`s. `model_dir` holds the initial policy as a Hugging Face directory: `export_hf(...)` of
the trainer's model (e.g. into run_dir/rollout_init/) or `model.path` itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from posttrain.errors import ConfigError
from posttrain.registry import Registry
from posttrain.rollout.completion import Completion
from posttrain.rollout.config import (
    BACKENDS,
    DTYPES,
    LOGPROBS_MODES,
    LORA_SYNCS,
    PROMPT_TRUNCATIONS,
    RolloutConfig,
    SamplingConfig,
)
from posttrain.rollout.groups import RolloutGroup, build_rollout_group, group_generates, own_completions
from posttrain.rollout.prompts import Prompt, prepare_prompts
from posttrain.rollout.weights import NamedTensors, is_lora, lora_adapter_state, policy_weights, unwrap_policy

log = logging.getLogger(__name__)


SLEEP_TAGS = ("weights", "kv_cache")  # what a sleeping engine released; woken separately (weights before a sync)


class RolloutBackend(Protocol):
    name: str
    max_model_len: int
    can_sleep: bool  # whether sleep() releases accelerator memory (vLLM on a GPU with enable_sleep_mode)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]: ...

    def load_weights(self, named_tensors: NamedTensors) -> None: ...

    def sleep(self, level: int) -> None: ...

    def wake_up(self, tags: Sequence[str]) -> None: ...

    def close(self) -> None: ...


ROLLOUT_BACKENDS: Registry = Registry("rollout backend")


@ROLLOUT_BACKENDS.register("vllm")
def _vllm(cfg: RolloutConfig, model_dir: str | Path, tokenizer, lora_rank: int | None = None) -> RolloutBackend:
    from posttrain.rollout.vllm_backend import build_vllm_backend

    return build_vllm_backend(cfg, model_dir, tokenizer, lora_rank)


@ROLLOUT_BACKENDS.register("hf")
def _hf(cfg: RolloutConfig, model_dir: str | Path, tokenizer) -> RolloutBackend:
    from posttrain.rollout.hf_backend import build_hf_backend

    return build_hf_backend(cfg, model_dir, tokenizer)


def as_sampling_config(sampling: SamplingConfig | Mapping[str, Any] | None) -> SamplingConfig:
    """A validated SamplingConfig from one, a dict / DictConfig with its keys, or None (the defaults)."""
    if sampling is None:
        sampling = SamplingConfig()
    elif not isinstance(sampling, SamplingConfig):
        known = {field.name for field in fields(SamplingConfig)}
        unknown = sorted(set(sampling) - known)
        if unknown:
            raise ConfigError(f"unknown sampling keys {unknown}; known keys: {sorted(known)}")
        sampling = SamplingConfig(**{key: sampling[key] for key in sampling})
    problems = [
        f"n={sampling.n} must be >= 1" if sampling.n < 1 else "",
        f"max_tokens={sampling.max_tokens} must be >= 1" if sampling.max_tokens < 1 else "",
        f"temperature={sampling.temperature} must be >= 0" if sampling.temperature < 0 else "",
        f"top_p={sampling.top_p} must be in (0, 1]" if not 0 < sampling.top_p <= 1 else "",
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise ConfigError("sampling: " + "; ".join(problems))
    return sampling


def validate_rollout_config(cfg: RolloutConfig) -> None:
    choices = {
        "backend": (cfg.backend, BACKENDS),
        "dtype": (cfg.dtype, DTYPES),
        "logprobs_mode": (cfg.logprobs_mode, LOGPROBS_MODES),
        "prompt_truncation": (cfg.prompt_truncation, PROMPT_TRUNCATIONS),
        "lora_sync": (cfg.lora_sync, LORA_SYNCS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"rollout.{key}={value!r} is not one of {', '.join(allowed)}")
    if cfg.sleep_level not in (1, 2):
        raise ConfigError(f"rollout.sleep_level={cfg.sleep_level} must be 1 or 2")
    if cfg.sync_bucket_mb < 1:
        raise ConfigError(f"rollout.sync_bucket_mb={cfg.sync_bucket_mb} must be >= 1")
    if cfg.tensor_parallel_size < 1:
        raise ConfigError(f"rollout.tensor_parallel_size={cfg.tensor_parallel_size} must be >= 1")


class RolloutService:
    """Samples completions from the current policy and takes the trainer's new weights."""

    def __init__(self, backend: RolloutBackend, tokenizer, cfg: RolloutConfig, group: RolloutGroup | None = None):
        self.backend = backend
        self.group = group  # under torchrun with tensor_parallel_size > 1: the ranks sharing this engine
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.last_sync_seconds: float | None = None
        self.last_sleep_freed_bytes: int | None = None  # accelerator memory the last sleep freed (None: not measured)
        self._asleep: set[str] = set()  # SLEEP_TAGS released and not yet woken
        self._weights_discarded = False  # a level-2 sleep dropped the weights: only a sync brings them back

    @property
    def max_model_len(self) -> int:
        return self.backend.max_model_len

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig | Mapping[str, Any] | None = None
    ) -> list[Completion]:
        """`n` completions per prompt, ordered by prompt then sample.

        prompts: chat conversations (rendered with the tokenizer's chat template and the generation
        prompt, exactly as trainers render them) or token id lists. A prompt that leaves no room for
        `max_tokens` in `max_model_len` raises a DataError naming it, or is left-truncated
        (rollout.prompt_truncation=left).

        A collective within the rollout group under torchrun with tensor_parallel_size > 1: every rank calls it
        the same number of times, also with no prompts (it returns []), or the group's engine hangs.
        """
        sampling = as_sampling_config(sampling)
        if not isinstance(prompts, (str, dict)) and not len(prompts):
            prompt_ids = []  # nothing to ask: a group member still joins its group's generate (below)
        else:
            prompt_ids = prepare_prompts(
                self.tokenizer, prompts, sampling.max_tokens, self.max_model_len, self.cfg.prompt_truncation
            )
        if self._weights_discarded:
            raise RuntimeError(
                "rollout: the engine slept at rollout.sleep_level=2, which discards its weights; call "
                "sync_weights (or use released(sync_from=model)) before generate"
            )
        self.wake_up()
        if self.group is None:
            return self.backend.generate(prompt_ids, sampling) if prompt_ids else []
        # One engine per group (SPMD): every member generates for the whole group's prompts, keeps its own.
        # Every member must call generate together, also with no prompts of its own (an empty list is allowed):
        # callers under torchrun call it on every rank, never behind `if prompts`. A group with no prompts at all
        # skips its engine on all its members alike; engines of different groups share no collective (vLLM's
        # data_parallel_size stays 1, each group is its own engine).
        requests, position = self.group.gather(prompt_ids, sampling)
        own: list[Completion] = []
        for call in group_generates(requests):  # the same calls, in the same order, on every member
            completions = self.backend.generate(call.prompt_ids, call.sampling)
            if position in call.members:
                own = own_completions(completions, call.start_of(position, requests), len(prompt_ids))
        return own

    def sync_weights(self, model: nn.Module) -> None:
        """Load `model`'s current weights into the engine and drop caches built on the old ones.

        `model`: a transformers CausalLM, a PEFT model, `CausalLMWithLogprobs`, or the DeepSpeed engine
        training one (ZeRO 0-3). Weights stream rollout.sync_bucket_mb at a time; a LoRA model sends only
        its adapter when `syncs_lora_adapter`, else its merged weights. Under ZeRO-3 it gathers parameters
        from every rank: all ranks must call it together. Wakes the engine's weights first if asleep.
        """
        self.wake_up(["weights"])  # the KV cache stays released until the next generate
        started = time.perf_counter()
        if self.syncs_lora_adapter(model):
            policy = unwrap_policy(model)
            self.backend.load_lora_adapter(lora_adapter_state(policy), policy.peft_config[policy.active_adapter])
        else:
            self.backend.load_weights(policy_weights(model, self.cfg.sync_bucket_mb << 20))
            self._weights_discarded = False
        self.last_sync_seconds = time.perf_counter() - started
        log.debug("rollout: weights synced in %.2f s", self.last_sync_seconds)

    def syncs_lora_adapter(self, model: nn.Module) -> bool:
        """Whether a sync of `model` sends only its LoRA adapter: a PEFT model, rollout.lora_sync=adapter and a
        backend started to take adapters (vLLM with lora_rank); otherwise merged full weights are streamed."""
        takes_adapters = getattr(self.backend, "takes_lora_adapters", False)
        return is_lora(model) and self.cfg.lora_sync == "adapter" and takes_adapters

    @property
    def sleep_enabled(self) -> bool:
        """rollout.enable_sleep_mode and a backend whose sleep frees memory (vLLM on a GPU)."""
        return self.cfg.enable_sleep_mode and self.backend.can_sleep

    def sleep(self) -> int | None:
        """Before training: release the engine's accelerator memory at rollout.sleep_level (1: weights
        offloaded to host, KV cache dropped; 2: both dropped). A no-op unless `sleep_enabled`, or when asleep.

        Returns the accelerator memory freed in bytes (measured with torch.cuda.mem_get_info), or None
        when nothing slept or there is no CUDA device. Under torchrun every rank of an engine calls it.
        """
        if not self.sleep_enabled or self._asleep:
            return None
        before = free_accelerator_bytes()
        self.backend.sleep(self.cfg.sleep_level)
        self._asleep = set(SLEEP_TAGS)
        self._weights_discarded = self.cfg.sleep_level == 2
        after = free_accelerator_bytes()
        self.last_sleep_freed_bytes = None if before is None or after is None else after - before
        if self.last_sleep_freed_bytes is not None:
            log.info(
                "rollout: engine asleep (level %d), %.2f GiB of GPU memory freed (%.2f GiB free)",
                self.cfg.sleep_level, self.last_sleep_freed_bytes / 2**30, after / 2**30,
            )  # fmt: skip
        return self.last_sleep_freed_bytes

    def wake_up(self, tags: Sequence[str] = SLEEP_TAGS) -> None:
        """Take back what `sleep` released (`tags` among "weights", "kv_cache"); a no-op for what is awake.

        generate wakes everything and sync_weights the weights, so callers rarely need this.
        """
        waking = [tag for tag in SLEEP_TAGS if tag in tags and tag in self._asleep]
        if waking:
            self.backend.wake_up(waking)
            self._asleep -= set(waking)

    @contextlib.contextmanager
    def released(self, sync_from: nn.Module | None = None) -> Iterator[None]:
        """Around a training step: the engine sleeps (when `sleep_enabled`) so the trainer gets its memory.

        On a normal exit with `sync_from`, the weights are woken and `sync_from`'s synced into them
        (`sync_weights`, a collective under ZeRO-3); the KV cache wakes at the next generate. Without
        `sync_from` the engine stays asleep until the next generate or sync (a level-2 sleep needs a sync).
        """
        self.sleep()
        yield
        if sync_from is not None:
            self.sync_weights(sync_from)

    def close(self) -> None:
        """Shut the backend's engine down (idempotent); torch.distributed's world stays. A trainer's service is closed
        at the end of its run (`posttrain.training.run_algorithm`), so the next run in the process starts afresh."""
        self.backend.close()


def free_accelerator_bytes() -> int | None:
    """Free memory on the current CUDA device (after a synchronize), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def build_rollout_service(
    rollout_cfg: RolloutConfig, model_dir: str | Path, tokenizer, lora_rank: int | None = None
) -> RolloutService:
    """A RolloutService on `rollout_cfg.backend`, loaded from the Hugging Face directory (or hub name) `model_dir`.

    `tokenizer` renders chat prompts; it must be the trainer's. Under torchrun call it on every rank
    at the same point (vLLM engines start together). Engine start-up problems raise ConfigError.
    `lora_rank`: the policy's LoRA rank when it trains adapters (peft=lora); with rollout.lora_sync=adapter a
    vLLM engine then takes adapters, and `model_dir` must hold the base model without them.
    """
    validate_rollout_config(rollout_cfg)
    takes_adapters = bool(lora_rank) and rollout_cfg.lora_sync == "adapter" and rollout_cfg.backend == "vllm"
    if takes_adapters and rollout_cfg.enable_sleep_mode and rollout_cfg.sleep_level == 2:
        raise ConfigError(
            "rollout.sleep_level=2 discards the engine's base weights, which an adapter sync (rollout.lora_sync="
            "adapter) never sends again; use rollout.sleep_level=1 or rollout.lora_sync=merged"
        )
    if rollout_cfg.backend == "vllm":
        from posttrain.engine.distributed import init_distributed

        init_distributed()  # vLLM's external launcher joins the trainer's world; the groups are made in it
    group = build_rollout_group(rollout_cfg.tensor_parallel_size)
    builder = ROLLOUT_BACKENDS.get(rollout_cfg.backend)
    if takes_adapters:
        backend = builder(rollout_cfg, model_dir, tokenizer, lora_rank=lora_rank)
    else:
        backend = builder(rollout_cfg, model_dir, tokenizer)
    return RolloutService(backend, tokenizer, rollout_cfg, group)
