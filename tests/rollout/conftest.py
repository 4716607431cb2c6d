"""Rollout test fixtures: the session's one vLLM engine (shared with other folders via rollout_helpers)."""

import pytest
from rollout_helpers import cpu_test_environment

cpu_test_environment()


@pytest.fixture(scope="session")
def rollout_service(tiny_tokenizer):
    """The process-wide vLLM RolloutService on the tiny model (~40 s to start, once)."""
    from rollout_helpers import shared_rollout_service

    return shared_rollout_service(tiny_tokenizer)


@pytest.fixture(scope="session")
def hf_rollout_service(tiny_tokenizer):
    from rollout_helpers import shared_rollout_service

    return shared_rollout_service(tiny_tokenizer, backend="hf")


@pytest.fixture(scope="session")
def sft_examples(tiny_tokenizer, arithmetic_rows):
    from posttrain.data.chat import tokenize_conversation

    return [tokenize_conversation(tiny_tokenizer, row["messages"]) for row in arithmetic_rows]


@pytest.fixture(scope="session")
def eval_prompts():
    """Six held-out arithmetic prompts as chat messages."""
    from data_recipes import generate_task

    return [row["prompt"] for row in generate_task("arithmetic", "eval", 6, seed=1)]


@pytest.fixture(scope="session")
def trained_policy(tiny_tokenizer, sft_examples):
    """The tiny policy after 40 SFT steps: confident enough that greedy decoding has no near-ties.

    Tests must not modify it (they copy it when they train further).
    """
    from rollout_helpers import tiny_policy, train_sft

    model = tiny_policy(tiny_tokenizer)
    train_sft(model, sft_examples, steps=40, lr=3e-3)
    return model
