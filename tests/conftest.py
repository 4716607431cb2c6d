"""Shared test set-up: CPU-only environment, tiny tokenizer/model fixtures, Hydra composition helper."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
from helpers import compose_config  # noqa: E402,F401  (kept importable from conftest for fixtures)

from posttrain.training import run_algorithm


@pytest.fixture(scope="session")
def arithmetic_rows():
    from data_recipes import generate_task

    return generate_task("arithmetic", "train", 256, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(arithmetic_rows):
    from posttrain.models.tokenizer import train_tokenizer

    texts = [message["content"] for row in arithmetic_rows for message in row["messages"]]
    return train_tokenizer(texts, vocab_size=512)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model

    return load_model(ModelConfig(), tiny_tokenizer, seed=0)


# SFT on the default task from demonstrations that forget 60% of the carries into the tens column
# (data_recipes.arithmetic noise): the model then answers carry problems wrong even greedily (held-out
# accuracy ~0.5), which a verifier-driven RLVR run can fix.
NOISY_SFT = ["train.epochs=2", "train.max_steps=500", "+data.generator_kwargs.noise=0.6"]


@pytest.fixture(scope="session")
def noisy_sft_model(tmp_path_factory):
    """final/ of a tiny-model SFT run on carry-forgetting demonstrations."""

    run_dir = tmp_path_factory.mktemp("noisy_sft")
    cfg = compose_config([f"run_dir={run_dir}", *NOISY_SFT, "logger.progress_bar=false", "data.num_eval=0"])
    return run_algorithm(cfg) / "final"
