"""The transformers backend on its own (no vLLM): log-prob semantics, stopping, seeds, batching."""

import copy
import dataclasses

import pytest
import torch
from rollout_helpers import recomputed_logprobs

from posttrain.rollout.config import RolloutConfig, SamplingConfig
from posttrain.rollout.hf_backend import HFBackend, finish_point
from posttrain.rollout.service import RolloutService


@pytest.fixture(scope="module")
def hf_service(tiny_tokenizer, trained_policy):
    """The backend on a copy of the trained tiny policy (readable text), batches of 3 prompts."""
    cfg = RolloutConfig(backend="hf", max_model_len=256, hf_batch_size=3)
    return RolloutService(HFBackend(copy.deepcopy(trained_policy), tiny_tokenizer, cfg), tiny_tokenizer, cfg)


def test_finish_point():
    decode = lambda tokens: "".join(chr(ord("a") + token) for token in tokens)  # noqa: E731
    assert finish_point([1, 2, 9, 3], {9}, [], decode) == (3, "token")
    assert finish_point([1, 2, 3, 4], {9}, [], decode) == (4, None)
    assert finish_point([1, 2, 3, 4], set(), ["cd"], decode) == (
        3,
        "string",
    )  # "bcde": "cd" is complete at the 3rd token
    assert finish_point([1, 9, 2, 3], {9}, ["cd"], decode) == (2, "token")  # the stop id comes first


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(temperature=0.0, max_tokens=12),
        SamplingConfig(temperature=0.7, max_tokens=12, n=2, seed=0),
        SamplingConfig(temperature=1.3, top_k=20, max_tokens=12, seed=1),
    ],
    ids=["greedy", "temperature", "top_k"],
)
def test_logprobs_are_under_the_sampling_distribution(hf_service, eval_prompts, sampling):
    """processed_logprobs = log_softmax(logits / T) at the sampled token when no top-k / top-p mass is cut.

    With top_k=20 the kept tokens are renormalised, so the recorded value is the recompute at T plus
    log(1 / kept mass) >= 0: larger, never smaller, and equal to it only if the cut mass was zero.
    """
    model = hf_service.backend.model
    temperature = sampling.temperature or 1.0
    for completion in hf_service.generate(eval_prompts[:4], sampling):
        recomputed = recomputed_logprobs(model, completion.prompt_token_ids, completion.token_ids, temperature)
        recorded = torch.tensor(completion.logprobs)
        if sampling.top_k:
            assert (recorded - recomputed).min() > -1e-5 and (recorded - recomputed).max() > 1e-3
        else:
            torch.testing.assert_close(recorded, recomputed, atol=1e-5, rtol=0)
        assert len(completion.token_ids) == len(completion.logprobs)


def test_raw_logprobs_ignore_temperature(hf_service, eval_prompts):
    raw = RolloutService(hf_service.backend, hf_service.tokenizer, hf_service.cfg)
    raw.backend = HFBackend(
        hf_service.backend.model,
        hf_service.tokenizer,
        dataclasses.replace(hf_service.cfg, logprobs_mode="raw_logprobs"),
    )
    completion = raw.generate(eval_prompts[:1], SamplingConfig(temperature=0.5, max_tokens=8, seed=0))[0]
    recomputed = recomputed_logprobs(raw.backend.model, completion.prompt_token_ids, completion.token_ids, 1.0)
    torch.testing.assert_close(torch.tensor(completion.logprobs), recomputed, atol=1e-5, rtol=0)


def test_batched_generation_equals_one_prompt_at_a_time(hf_service, eval_prompts):
    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    together = hf_service.generate(eval_prompts, greedy)  # 6 prompts of different lengths, batches of 3
    alone = [hf_service.generate([prompt], greedy)[0] for prompt in eval_prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [(c.prompt_index, c.sample_index) for c in together] == [(i, 0) for i in range(6)]


def test_seeds_reproduce_and_the_trainer_rng_is_untouched(hf_service, eval_prompts):
    sampling = SamplingConfig(temperature=1.0, max_tokens=8, n=2, seed=5)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = [c.token_ids for c in hf_service.generate(eval_prompts[:2], sampling)]
    unseeded = [c.token_ids for c in hf_service.generate(eval_prompts[:2], dataclasses.replace(sampling, seed=None))]
    unseeded_again = [
        c.token_ids for c in hf_service.generate(eval_prompts[:2], dataclasses.replace(sampling, seed=None))
    ]
    assert torch.rand(1) == expected_next
    assert [c.token_ids for c in hf_service.generate(eval_prompts[:2], sampling)] == first
    assert unseeded != unseeded_again  # the backend's own stream advances


def test_stop_string_cuts_text_and_keeps_its_token(hf_service, eval_prompts):
    free = hf_service.generate(eval_prompts[:1], SamplingConfig(temperature=0.0, max_tokens=24))[0]
    assert free.finish_reason == "stop" and free.token_ids[-1] == hf_service.tokenizer.eos_token_id
    middle = len(free.text) // 2
    stop = free.text[middle : middle + 2]
    stopped = hf_service.generate(eval_prompts[:1], SamplingConfig(temperature=0.0, max_tokens=24, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert stop in hf_service.tokenizer.decode(stopped.token_ids) and stop not in hf_service.tokenizer.decode(
        stopped.token_ids[:-1]
    )


def test_stop_token_id_is_kept(hf_service, eval_prompts):
    free = hf_service.generate(eval_prompts[:1], SamplingConfig(temperature=0.0, max_tokens=24))[0]
    stop_id = free.token_ids[5]
    stopped = hf_service.generate(
        eval_prompts[:1], SamplingConfig(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id])
    )[0]
    first = free.token_ids.index(stop_id)
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.text == hf_service.tokenizer.decode(
        free.token_ids[:first]
    )  # the stop token's text is left out, as vLLM
