"""Load or build the policy model and its tokenizer.

`model.path` set: any causal LM from the Hugging Face hub or a local directory.
`model.path` null: the tiny Llama-style default, built from `model.tiny` with a tokenizer trained
locally on the task text. The tokenizer is saved in the run dir so a resumed run reuses it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from posttrain.errors import ConfigError
from posttrain.models.attention import resolve_attn_implementation, use_packed_sdpa
from posttrain.models.tokenizer import CHAT_TEMPLATE, train_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(model_cfg, texts: Iterable[str] | None, save_dir: Path | None) -> PreTrainedTokenizerBase:
    """The tokenizer for `model_cfg`: from `model.path`, from `save_dir` if saved, else trained on `texts`."""
    if model_cfg.path:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError) as error:  # not found, offline, not a model directory
            raise _unloadable(model_cfg.path, "tokenizer", error) from None
        if model_cfg.chat_template:
            tokenizer.chat_template = model_cfg.chat_template
        elif tokenizer.chat_template is None:
            log.warning("%s has no chat template; using posttrain's default template", model_cfg.path)
            tokenizer.chat_template = CHAT_TEMPLATE
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if save_dir is not None and (save_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(save_dir))
    if texts is None:
        raise ConfigError("the tiny model needs task text to train its tokenizer; none was given")
    tokenizer = train_tokenizer(texts, vocab_size=model_cfg.tiny.vocab_size)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def _unloadable(path: str, what: str, error: Exception) -> ConfigError:
    reason = " ".join(str(error).split())[:300]
    where = "the local directory exists" if Path(path).is_dir() else "no such local directory; as a hub name"
    return ConfigError(
        f"model.path={path}: cannot load its {what} ({where}: {reason}); give a Hugging Face model directory "
        "(e.g. a run's final/) or a hub name reachable online or in the local cache"
    )


def tiny_llama_config(tiny_cfg, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """A Llama config from `model.tiny`; head_dim = hidden / heads must be >= 32 for vLLM's CPU backend."""
    head_dim = tiny_cfg.hidden_size // tiny_cfg.num_heads
    if head_dim < 32:
        raise ConfigError(
            f"model.tiny gives head_dim {head_dim} (hidden_size {tiny_cfg.hidden_size} / num_heads "
            f"{tiny_cfg.num_heads}); vLLM's CPU attention needs head_dim >= 32"
        )
    # Round the vocabulary up to a multiple of 64 so the embedding shapes stay kernel-friendly.
    vocab_size = -(-len(tokenizer) // 64) * 64
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size,
        num_hidden_layers=tiny_cfg.num_layers,
        num_attention_heads=tiny_cfg.num_heads,
        num_key_value_heads=tiny_cfg.num_kv_heads,
        max_position_embeddings=tiny_cfg.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@contextlib.contextmanager
def sharded_init(ds_config: dict | None):
    """Inside, under a ZeRO-3 `ds_config`, models are created partitioned as they are built: transformers'
    DeepSpeed integration (an `HfDeepSpeedConfig` alive while loading) makes `from_pretrained` load each rank's
    shard and `from_config` build inside `deepspeed.zero.Init`, so no rank ever holds a whole copy. Elsewhere (no
    config, another stage) a no-op. Models created after the block (a rollout engine's own copy) are plain."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    fixed = "MALLOC_MMAP_THRESHOLD_" not in os.environ and mmap_threshold(LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        del keep_alive
        release_free_heap()
        if fixed:
            mmap_threshold(STEADY_MMAP_THRESHOLD)


LOAD_MMAP_THRESHOLD = 1 << 20  # while loading partitioned: blocks >= 1 MiB are mapped, so a free returns them
STEADY_MMAP_THRESHOLD = 32 << 20  # after: glibc's dynamic threshold's own ceiling on 64-bit, where it settles


def mmap_threshold(size: int) -> bool:
    """Fix glibc's M_MMAP_THRESHOLD at `size` bytes (True), or False where it cannot (not glibc).

    glibc serves blocks above the threshold with their own mapping, released on free; below it from the heap,
    which keeps freed memory. By default the threshold is dynamic: every freed mapped block raises it to that
    block's size (up to 32 MiB), so after the first gathered module is freed, the next modules' whole weights
    come from the heap, and the freed ones stay resident: with a bf16 checkpoint cast to fp32 (ZeRO-3, 2 ranks,
    202M parameters) a rank's own memory peaked at +884 MB during the load with sharded_init, more than the
    808 MB of a whole copy, against +456 MB (its 404 MB shard and a module) with the threshold fixed at 1 MiB
    (benchmarks/sharded_load.py --stored-dtype bfloat16). Setting it also turns the dynamic rule off."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, size))  # -3: M_MMAP_THRESHOLD


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the OS (glibc's `malloc_trim`; a no-op elsewhere). Partitioned
    loading gathers each module's whole weights, initialises or fills them, and frees them again, module after
    module; glibc keeps many of those freed blocks in the process, so each rank's resident set after the load
    stays hundreds of MB above its shard (benchmarks/sharded_load.py) unless they are released."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return
    trim(0)


def load_model(
    model_cfg, tokenizer: PreTrainedTokenizerBase, seed: int, ds_config: dict | None = None
) -> torch.nn.Module:
    """The causal LM for `model_cfg` (initialised deterministically from `seed` when built from config). With a
    ZeRO-3 `ds_config`, weights from `model_cfg.path` load partitioned (`sharded_init`); a model built from config
    is built whole, so its initial weights are the same for every world size."""
    dtype = torch_dtype(model_cfg.dtype)
    attn_implementation = resolve_attn_implementation(model_cfg.attn_implementation)
    if model_cfg.path:
        try:
            with sharded_init(ds_config):
                model = AutoModelForCausalLM.from_pretrained(
                    model_cfg.path,
                    dtype=dtype,
                    attn_implementation=attn_implementation,
                    trust_remote_code=model_cfg.trust_remote_code,
                )
        except (OSError, ValueError) as error:
            raise _unloadable(model_cfg.path, "model", error) from None
    else:
        config = tiny_llama_config(model_cfg.tiny, tokenizer)
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    use_packed_sdpa(model)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but {model_cfg.path}'s embedding only "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
        )
    return model
