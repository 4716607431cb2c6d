"""The frozen reference policy of the DPO family: its log-probs computed once and cached on disk.

Reference log-probs are constants of the dataset (REFERENCE.md section 2), so instead of a second
model in memory and a second forward every step, `cached_reference_logprobs` runs the reference once
over the pairs (each rank a strided shard, then gathered), stores the per-sequence SUMS and response
lengths in `<cache_dir>/<key>.pt`, and the caller frees the model. A later run with the same key loads
the file and never builds or runs the reference model.

The key is a SHA-256 over everything that changes the numbers (`reference_cache_key`): the model's
identity and weights fingerprint, the token ids and labels of every pair (which already reflect the
data content, chat template, tokenizer, max length and truncation; the template, tokenizer vocabulary
and max length are also hashed explicitly), dtype, the log-prob kernel, and the statistic stored.
Sums and lengths serve every loss of the family (the length-normalised ones divide the two), so the
loss name is deliberately not part of the key: dpo and dpo_norm share one cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from posttrain.data.cache import cache_root, content_hash, tokenizer_fingerprint
from posttrain.data.preference import PreferenceExample, collate_pairs, pair_lengths
from posttrain.engine.distributed import barrier, is_main_process, rank_share, world_size
from posttrain.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or the meaning of the stored numbers changes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".model")


@dataclass
class ReferenceLogprobs:
    """Per-pair reference sums of response-token log-probs, [N] float32 each, in dataset order."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    def take(self, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(indices, dtype=torch.long)
        return self.chosen[index].to(device), self.rejected[index].to(device)


def default_cache_dir() -> Path:
    return cache_root() / "reference_logps"


def examples_fingerprint(examples: list[PreferenceExample]) -> str:
    """BLAKE2 of every pair's token ids, labels and prompt length, in order."""
    digest = hashlib.blake2b(digest_size=32)
    for example in examples:
        for sequence in (example.chosen, example.rejected):
            digest.update(torch.tensor(sequence.input_ids, dtype=torch.int64).numpy().tobytes())
            digest.update(torch.tensor(sequence.labels, dtype=torch.int64).numpy().tobytes())
            digest.update(b"|")
        digest.update(str(example.prompt_length).encode() + b";")
    return digest.hexdigest()


def directory_fingerprint(path: Path) -> str:
    """Names, sizes and modification times of a model directory's weight/config files (cheap for 70B).

    Rewriting the weights (an export, a copy) changes the fingerprint; it never needs to read them.
    """
    entries = []
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in WEIGHT_SUFFIXES:
            stat = file.stat()
            entries.append([str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    if not entries:
        raise ConfigError(f"reference model directory {path} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def model_fingerprint(model_path: str | None, tiny: dict, seed: int) -> dict:
    """Identity of the reference weights, without reading them: a local dir's file fingerprint, a hub
    repo's commit, or the tiny model's config + init seed (it is built deterministically from them)."""
    if model_path is None:
        return {"tiny": tiny, "seed": seed, "torch": torch.__version__.split("+")[0]}
    path = Path(model_path)
    if path.is_dir():
        return {"dir": str(path.resolve()), "files": directory_fingerprint(path)}
    try:
        from huggingface_hub import HfApi

        return {"hub": model_path, "revision": HfApi().model_info(model_path).sha}
    except Exception as error:  # offline or unknown: the cached snapshot's directory name is its commit
        from huggingface_hub import snapshot_download

        try:
            return {"hub": model_path, "revision": Path(snapshot_download(model_path, local_files_only=True)).name}
        except Exception:
            raise ConfigError(
                f"cannot fingerprint reference model {model_path!r} ({error}); download it to a local directory "
                "and pass that path, or set algo.reference.cache=false"
            ) from None


def reference_cache_key(
    *,
    model: dict,
    examples: list[PreferenceExample],
    tokenizer,
    max_length: int,
    truncation: str,
    dtype: str,
    fused: bool,
) -> str:
    """SHA-256 over everything that changes the cached numbers (see the module docstring)."""
    vocab = tokenizer_fingerprint(tokenizer)
    parts = {
        "format": CACHE_FORMAT,
        "model": model,
        "data": examples_fingerprint(examples),
        "num_pairs": len(examples),
        "chat_template": tokenizer.chat_template,
        "tokenizer_vocab": vocab,
        "max_length": max_length,
        "truncation": truncation,
        "dtype": dtype,
        "fused_logprobs": fused,
        "statistic": "response_logprob_sum",  # sums + lengths; means are derived, so one cache serves all losses
    }
    return content_hash(parts)


@torch.no_grad()
def compute_reference_logprobs(
    model,
    examples: list[PreferenceExample],
    micro_batch_size: int,
    packing: bool,
    pad_token_id: int,
    device,
    max_tokens: int | None = None,
) -> ReferenceLogprobs:
    """Sums for every pair: this rank scores pairs rank, rank + world, ...; the shards are gathered. Forwards hold
    `micro_batch_size` pairs, or as many as fit in `max_tokens` tokens (train.max_tokens_per_micro_batch); every
    rank runs as many forwards as the busiest (ZeRO-3 gathers parameters in each)."""
    from posttrain.models.logprobs import agreed_batches, idle_forward, pair_logprob_sums, scoring_batches

    shared, real = rank_share(range(len(examples)))  # equal shares on every rank
    sizes = [pair_lengths(examples[i]) for i in shared]
    chosen, rejected = [0.0] * len(shared), [0.0] * len(shared)
    for batch in agreed_batches(scoring_batches(sizes, micro_batch_size, max_tokens, padded=not packing)):
        if batch is None:
            idle_forward(model)
            continue
        pairs = [examples[shared[position]] for position in batch]
        sums = pair_logprob_sums(model, collate_pairs(pairs, packing, pad_token_id).to(device))
        for position, chosen_sum, rejected_sum in zip(batch, sums[0].tolist(), sums[1].tolist()):
            chosen[position], rejected[position] = chosen_sum, rejected_sum
    mine = [index for index, keep in zip(shared, real) if keep]
    chosen, rejected = chosen[: len(mine)], rejected[: len(mine)]  # padding comes last
    shards = [(mine, chosen, rejected)]
    if world_size() > 1:
        shards = [None] * world_size()
        dist.all_gather_object(shards, (mine, chosen, rejected))
    full_chosen, full_rejected = torch.empty(len(examples)), torch.empty(len(examples))
    for indices, shard_chosen, shard_rejected in shards:
        full_chosen[indices] = torch.tensor(shard_chosen, dtype=torch.float32)
        full_rejected[indices] = torch.tensor(shard_rejected, dtype=torch.float32)
    return ReferenceLogprobs(full_chosen, full_rejected)


def read_reference_cache(path: Path, key: str, num_pairs: int) -> tuple[ReferenceLogprobs | None, str]:
    """(the cached log-probs, "") or (None, what is wrong: unreadable (truncated, not a tensor file, a pickle with
    objects, which weights_only refuses), another key, or not `num_pairs` finite sums each)."""
    try:
        stored = torch.load(path, weights_only=True)
        chosen, rejected = stored["chosen"], stored["rejected"]
    except Exception as error:  # truncated zip, pickled objects, missing keys: a broken file, never fatal
        return None, f"is unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    if stored.get("key") != key:
        return None, "belongs to another run (its key differs)"
    for values in (chosen, rejected):
        if not torch.is_tensor(values) or values.shape != (num_pairs,) or not torch.isfinite(values).all():
            return None, f"does not hold {num_pairs} finite sums per side"
    return ReferenceLogprobs(chosen, rejected), ""


def cached_reference_logprobs(
    key: str, cache_dir: Path, num_pairs: int, compute: Callable[[], ReferenceLogprobs]
) -> tuple[ReferenceLogprobs, bool]:
    """(log-probs, hit): read `<cache_dir>/<key>.pt`, or call `compute()` on every rank and write it (rank 0,
    atomically: a temporary file renamed into place, so a killed run never leaves a half file)."""
    path = Path(cache_dir) / f"{key}.pt"
    if path.exists():
        stored, problem = read_reference_cache(path, key, num_pairs)
        if stored is not None:
            log.info("reference log-probs: cache hit %s (%d pairs); no reference model needed", path, num_pairs)
            return stored, True
        log.warning("reference log-prob cache %s %s; recomputing it", path, problem)
    result = compute()
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        torch.save({"key": key, "chosen": result.chosen, "rejected": result.rejected}, staging)
        os.replace(staging, path)
        log.info("reference log-probs: computed %d pairs, cached in %s", num_pairs, path)
    barrier()
    return result, False


def frozen_model(module: torch.nn.Module, zero_stage: int, dtype: str, offload_params: bool = False):
    """`module` ready for no-grad forwards: on the accelerator in eval mode, or (ZeRO-3) partitioned by a
    DeepSpeed engine without an optimizer, so a 70B reference fits beside the policy."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    module.eval()
    if zero_stage != 3:
        from deepspeed.accelerator import get_accelerator

        return module.to(get_accelerator().current_device_name())
    import deepspeed

    zero = {"stage": 3}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
    }
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine
