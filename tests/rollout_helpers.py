"""Test helpers for every test folder that samples (rollout, RLVR, GPO): one vLLM engine per process.

A vLLM engine takes ~40 s to start and warm up on CPU, so tests share one:

    @pytest.fixture(scope="session")
    def rollout_service(tiny_tokenizer):
        return shared_rollout_service(tiny_tokenizer)

`shared_rollout_service` caches per process (so fixtures in different test folders get the same
engine) and starts from `tiny_policy(tokenizer)`'s weights. The engine is shared state: a test
must `sync_weights` the model it compares against before generating, never rely on what a
previous test left in it.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from posttrain.rollout.config import RolloutConfig
from posttrain.rollout.service import RolloutService, build_rollout_service

# Small enough for a 2-core CI machine; big enough for the tests' prompts and completions.
TEST_ROLLOUT_CONFIG = RolloutConfig(max_model_len=512, max_num_seqs=64, kv_cache_gib=0.5, enforce_eager=True)

_services: dict[tuple, RolloutService] = {}


def cpu_test_environment() -> None:
    """Environment for in-process vLLM on CPU under tests (set before vLLM is imported)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_policy(tokenizer, seed: int = 0, dtype: str = "float32") -> torch.nn.Module:
    """The default tiny Llama (`ModelConfig()`) for `tokenizer`, initialised from `seed`."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model

    return load_model(ModelConfig(dtype=dtype), tokenizer, seed)


def save_policy_dir(model: torch.nn.Module, tokenizer, out_dir: Path) -> Path:
    """`model` + `tokenizer` as a Hugging Face directory the rollout engines load."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _tokenizer_key(tokenizer) -> str:
    vocabulary = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocabulary).encode()).hexdigest()[:16]


def shared_rollout_service(tokenizer, backend: str = "vllm", **overrides) -> RolloutService:
    """The process-wide RolloutService on `tiny_policy(tokenizer)` for `backend` and `TEST_ROLLOUT_CONFIG` + overrides.

    Built on first use (the policy is written to a temporary directory removed at exit) and reused
    for every later call with the same tokenizer vocabulary, backend and overrides.
    """
    cpu_test_environment()
    key = (_tokenizer_key(tokenizer), backend, tuple(sorted(overrides.items())))
    if key not in _services:
        model_dir = Path(tempfile.mkdtemp(prefix="posttrain-rollout-"))
        atexit.register(shutil.rmtree, model_dir, True)
        save_policy_dir(tiny_policy(tokenizer), tokenizer, model_dir)
        cfg = dataclasses.replace(TEST_ROLLOUT_CONFIG, backend=backend, **overrides)
        _services[key] = build_rollout_service(cfg, model_dir, tokenizer)
    return _services[key]


@torch.no_grad()
def reference_greedy(
    model: torch.nn.Module, prompt_ids: list[list[int]], max_tokens: int, eos_token_id: int
) -> list[list[int]]:
    """transformers greedy completions, one unpadded prompt at a time (the reference the engines must equal)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id
    )
    completions = []
    for ids in prompt_ids:
        input_ids = torch.tensor([ids], device=model.device)
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
        completions.append(output[0, len(ids) :].tolist())
    return completions


@torch.no_grad()
def recomputed_logprobs(
    model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """float32 [len(completion_ids)] log-probs of the completion under `model` as trainers compute them.

    Goes through `CausalLMWithLogprobs` (the module trainers hand to the engine) with the reference
    kernel, at `temperature` (logits / temperature before the softmax).
    """
    from posttrain.data.chat import IGNORE_INDEX
    from posttrain.models.logprob_model import CausalLMWithLogprobs

    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    targets = torch.full_like(ids, IGNORE_INDEX)
    start = len(prompt_ids) - 1  # position predicting the first completion token
    targets[0, start:-1] = ids[0, start + 1 :]
    logprobs, _ = CausalLMWithLogprobs(model, fused=False)(ids, targets, temperature=temperature)
    return logprobs[0, start:-1].float().cpu()


def train_sft(model: torch.nn.Module, examples: list, steps: int, lr: float, batch_size: int = 16) -> float:
    """A few plain AdamW steps of assistant-token NLL through `CausalLMWithLogprobs`; returns the last loss.

    Moves a test policy away from the weights an engine was started or synced with. Examples are
    `TokenizedExample`s, taken in order (wrapping around), packed `batch_size` per step.
    """
    from posttrain.data.batching import collate
    from posttrain.data.chat import IGNORE_INDEX
    from posttrain.models.logprob_model import CausalLMWithLogprobs

    module = CausalLMWithLogprobs(model, fused=False).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        start = (step * batch_size) % len(examples)
        batch = collate((examples + examples)[start : start + batch_size], packing=True, pad_token_id=0)
        targets = batch.pop("targets")
        logprobs, _ = module(targets=targets, **batch)
        mask = targets != IGNORE_INDEX
        loss = -(logprobs * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())
