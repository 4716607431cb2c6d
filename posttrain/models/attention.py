"""Which attention kernel transformers runs: `model.attn_implementation`, with `auto` resolved here.

`auto` picks flash_attention_2 when the flash_attn package (version 2) imports and a CUDA GPU is present,
sdpa otherwise, and logs the choice. posttrain packs a micro-batch's sequences into one row whose position_ids
restart at 0 for each sequence (`posttrain.data.batching.collate_packed`) and passes no attention mask:
under flash_attention_2 transformers turns those position ids into the varlen kernel's cumulative sequence
lengths (padding-free, no N x N mask); under sdpa it builds the block-diagonal mask from them.
"""

from __future__ import annotations

import importlib
import logging

import torch

log = logging.getLogger("posttrain")

AUTO = "auto"


def flash_attn_2_version() -> str | None:
    """The version of the importable flash_attn 2 package, or None (absent, broken build, or not version 2)."""
    try:
        module = importlib.import_module("flash_attn")
    except Exception:  # a wheel built for another torch / CUDA raises ImportError or OSError on import
        return None
    version = str(getattr(module, "__version__", ""))
    return version if version.startswith("2.") else None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_attn_implementation(requested: str) -> str:
    """`requested` as transformers' attn_implementation: `auto` becomes flash_attention_2 (flash_attn 2 imports
    and a CUDA GPU is present) or sdpa, logged; any other name passes through unchanged."""
    if requested != AUTO:
        return requested
    version, gpu = flash_attn_2_version(), cuda_available()
    if version and gpu:
        log.info("model.attn_implementation=auto: flash_attention_2 (flash_attn %s, CUDA GPU present)", version)
        return "flash_attention_2"
    reason = "no CUDA GPU" if not gpu else "the flash_attn 2 package does not import"
    log.info("model.attn_implementation=auto: sdpa (%s)", reason)
    return "sdpa"
