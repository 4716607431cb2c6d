"""Helpers shared by the benchmark scripts: the benchmark model built locally, and peak memory.

Run as `python benchmarks/<script>.py`, a script finds this module next to it (`from common import ...`).
"""

from __future__ import annotations

from pathlib import Path


def arithmetic_tokenizer():
    """posttrain's byte-level BPE tokenizer (with its chat template) trained on the arithmetic task's text:
    2,000 train rows, seed 0, at most 512 tokens (~320 in practice, so the model's vocabulary stays small)."""
    from data_recipes import generate_task
    from posttrain.models.tokenizer import train_tokenizer

    rows = generate_task("arithmetic", "train", 2000, seed=0)
    return train_tokenizer([m["content"] for row in rows for m in row["messages"]], vocab_size=512)


def save_tiny_llama(out_dir: Path, tokenizer, size: dict, seed: int):
    """A Llama built from posttrain's tiny-model config with random weights from `seed`, saved in float32 with
    `tokenizer` as a Hugging Face directory at `out_dir`; returns the model.

    `size` holds hidden_size, num_layers, num_heads, num_kv_heads and intermediate_size (other keys are ignored);
    the vocabulary is the tokenizer's, rounded up to a multiple of 64 (`tiny_llama_config`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.config import TinyModelConfig
    from posttrain.models.loading import tiny_llama_config

    tiny = TinyModelConfig(
        **{key: size[key] for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tiny, tokenizer), dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def rss_mb(field: str) -> float:
    """A memory field of this process from /proc/self/status in MB: "VmRSS" (now) or "VmHWM" (peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
