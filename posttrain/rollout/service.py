"""`RolloutService`: the one way every sampler in posttrain (RLVR, GPO, on-policy data, evals) samples the policy.

    service = build_rollout_service(cfg.rollout, model_dir, tokenizer)   # on every rank, together
    completions = service.generate(prompts, SamplingConfig(n=4, temperature=1.0, max_tokens=256))
    ... train ...
    service.sync_weights(engine)   # a collective under ZeRO-3: every rank calls it

The backend (`vllm` or `hf`) is picked by `rollout.backend` from a registry; both return the same
`Completion`s. `model_dir` holds the initial policy as a Hugging Face directory: `export_hf(...)` of
the trainer's model (e.g. into run_dir/rollout_init/) or `model.path` itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from posttrain.errors import ConfigError
from posttrain.registry import Registry
from posttrain.rollout.completion import Completion
from posttrain.rollout.config import BACKENDS, DTYPES, LOGPROBS_MODES, PROMPT_TRUNCATIONS, RolloutConfig, SamplingConfig
from posttrain.rollout.prompts import Prompt, prepare_prompts
from posttrain.rollout.weights import NamedTensors, policy_weights

log = logging.getLogger(__name__)


class RolloutBackend(Protocol):
    name: str
    max_model_len: int

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]: ...

    def load_weights(self, named_tensors: NamedTensors) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...


ROLLOUT_BACKENDS: Registry = Registry("rollout backend")


@ROLLOUT_BACKENDS.register("vllm")
def _vllm(cfg: RolloutConfig, model_dir: str | Path, tokenizer) -> RolloutBackend:
    from posttrain.rollout.vllm_backend import build_vllm_backend

    return build_vllm_backend(cfg, model_dir, tokenizer)


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
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"rollout.{key}={value!r} is not one of {', '.join(allowed)}")
    if cfg.sleep_level not in (1, 2):
        raise ConfigError(f"rollout.sleep_level={cfg.sleep_level} must be 1 or 2")


class RolloutService:
    """Samples completions from the current policy and takes the trainer's new weights."""

    def __init__(self, backend: RolloutBackend, tokenizer, cfg: RolloutConfig):
        self.backend = backend
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.last_sync_seconds: float | None = None

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
        """
        sampling = as_sampling_config(sampling)
        prompt_ids = prepare_prompts(
            self.tokenizer, prompts, sampling.max_tokens, self.max_model_len, self.cfg.prompt_truncation
        )
        return self.backend.generate(prompt_ids, sampling)

    def sync_weights(self, model: nn.Module) -> None:
        """Load `model`'s current weights into the engine and drop caches built on the old ones.

        `model`: a transformers CausalLM, a PEFT model (LoRA merged), `CausalLMWithLogprobs`, or the
        DeepSpeed engine training one (ZeRO 0-3). Under ZeRO-3 it gathers parameters from every rank:
        all ranks must call it together, and each rank's engine receives the full weights.
        """
        started = time.perf_counter()
        self.backend.load_weights(policy_weights(model))
        self.last_sync_seconds = time.perf_counter() - started
        log.debug("rollout: weights synced in %.2f s", self.last_sync_seconds)

    def sleep(self) -> None:
        """Before training: free the engine's accelerator memory (vLLM on GPU with rollout.enable_sleep_mode)."""
        self.backend.sleep()

    def wake_up(self) -> None:
        """Restore the engine after `sleep` (generate and sync_weights also wake it as needed)."""
        self.backend.wake_up()


def build_rollout_service(rollout_cfg: RolloutConfig, model_dir: str | Path, tokenizer) -> RolloutService:
    """A RolloutService on `rollout_cfg.backend`, loaded from the Hugging Face directory (or hub name) `model_dir`.

    `tokenizer` renders chat prompts; it must be the trainer's. Under torchrun call it on every rank
    at the same point (vLLM engines start together). Engine start-up problems raise ConfigError.
    """
    validate_rollout_config(rollout_cfg)
    backend = ROLLOUT_BACKENDS.get(rollout_cfg.backend)(rollout_cfg, model_dir, tokenizer)
    return RolloutService(backend, tokenizer, rollout_cfg)
