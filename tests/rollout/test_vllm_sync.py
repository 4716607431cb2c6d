"""The vLLM backend against transformers: weight sync (plain, LoRA, DeepSpeed engine), log-prob semantics,
stopping and prompts, on the session's one engine (`rollout_service`).

Tolerance: both sides compute in float32 on CPU; vLLM's fused kernels (attention, RMSNorm, SiLU-and-mul)
sum in a different order than transformers', so per-token log-probs agree to ~1e-6; we allow
LOGPROB_ATOL = 1e-4, far below the gap a stale weight gives (> 0.1).
"""

import copy
import dataclasses

import pytest
import torch
from rollout_helpers import recomputed_logprobs, reference_greedy, tiny_policy, train_sft

from posttrain.data.chat import render_ids
from posttrain.errors import DataError
from posttrain.rollout import RolloutService, SamplingConfig

pytestmark = pytest.mark.vllm

LOGPROB_ATOL = 1e-4
MAX_TOKENS = 24  # arithmetic answers are ~15 tokens
GREEDY = SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides)


def prompt_ids(tokenizer, prompts):
    return [render_ids(tokenizer, prompt, add_generation_prompt=True) for prompt in prompts]


def assert_engine_matches(service, model, prompts, tokenizer) -> None:
    """Greedy completions equal transformers' token for token; log-probs equal the trainer's recompute."""
    expected = reference_greedy(model, prompt_ids(tokenizer, prompts), MAX_TOKENS, tokenizer.eos_token_id)
    completions = service.generate(prompts, GREEDY)
    assert [c.token_ids for c in completions] == expected
    for completion in completions:
        recomputed = recomputed_logprobs(model, completion.prompt_token_ids, completion.token_ids)
        torch.testing.assert_close(torch.tensor(completion.logprobs), recomputed, atol=LOGPROB_ATOL, rtol=0)
        ended_by_eos = completion.token_ids[-1] == tokenizer.eos_token_id
        assert completion.finish_reason == ("stop" if ended_by_eos else "length")
        assert ended_by_eos or len(completion.token_ids) == MAX_TOKENS


def assert_engine_differs(service, model, prompts, tokenizer) -> None:
    expected = reference_greedy(model, prompt_ids(tokenizer, prompts), MAX_TOKENS, tokenizer.eos_token_id)
    assert [c.token_ids for c in service.generate(prompts, GREEDY)] != expected


def test_sync_after_training_plain_model(rollout_service, tiny_tokenizer, trained_policy, eval_prompts):
    rollout_service.sync_weights(tiny_policy(tiny_tokenizer))  # the engine holds the untrained weights
    assert_engine_differs(rollout_service, trained_policy, eval_prompts, tiny_tokenizer)
    rollout_service.sync_weights(trained_policy)
    assert_engine_matches(rollout_service, trained_policy, eval_prompts, tiny_tokenizer)
    assert any(c.finish_reason == "stop" for c in rollout_service.generate(eval_prompts, GREEDY))


def test_sync_lora_model_merges_adapters(rollout_service, tiny_tokenizer, trained_policy, sft_examples, eval_prompts):
    from posttrain.config import PeftConfig
    from posttrain.models.lora import wrap_lora

    model = wrap_lora(copy.deepcopy(trained_policy), PeftConfig(enabled=True, r=8, alpha=16))
    rollout_service.sync_weights(model)  # adapters start at zero: the engine holds the base weights
    train_sft(model, sft_examples[64:], steps=10, lr=2e-2)
    assert_engine_differs(rollout_service, model, eval_prompts, tiny_tokenizer)
    rollout_service.sync_weights(model)
    assert_engine_matches(rollout_service, model, eval_prompts, tiny_tokenizer)


def test_sync_from_deepspeed_engine(
    rollout_service, tiny_tokenizer, trained_policy, sft_examples, eval_prompts, tmp_path
):
    """The DeepSpeed engine (ZeRO-0 here; ZeRO-3 runs under torchrun in test_zero3_sync) is unwrapped to its policy."""
    from posttrain.data.batching import collate
    from posttrain.data.chat import IGNORE_INDEX
    from posttrain.engine.backend import build_engine
    from posttrain.engine.distributed import init_distributed
    from posttrain.models.logprob_model import CausalLMWithLogprobs

    init_distributed()
    cfg = _compose(
        ["deepspeed=zero0", f"run_dir={tmp_path}", "optim.lr=1e-2", "optim.warmup_ratio=0", "train.micro_batch_size=16"]
    )
    engine = build_engine(CausalLMWithLogprobs(copy.deepcopy(trained_policy), fused=False), cfg, total_steps=5)
    rollout_service.sync_weights(engine)
    for step in range(5):
        batch = collate(sft_examples[16 * step : 16 * step + 16], packing=True, pad_token_id=0)
        targets = batch.pop("targets")
        logprobs, _ = engine(targets=targets, **batch)
        mask = targets != IGNORE_INDEX
        engine.backward(-(logprobs * mask).sum() / mask.sum(), scale_wrt_gas=False)
        engine.step()
    policy = engine.module.policy.eval()
    assert_engine_differs(rollout_service, policy, eval_prompts, tiny_tokenizer)
    rollout_service.sync_weights(engine)
    assert_engine_matches(rollout_service, policy, eval_prompts, tiny_tokenizer)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(temperature=0.8, n=3, seed=7, max_tokens=MAX_TOKENS),
        SamplingConfig(temperature=1.2, top_k=5, n=2, seed=3, max_tokens=MAX_TOKENS),
    ],
    ids=["temperature", "top_k"],
)
def test_sampled_logprobs_are_under_the_sampling_distribution(rollout_service, trained_policy, eval_prompts, sampling):
    """processed_logprobs: log_softmax(logits / T) at the sampled token; with top-k, renormalised over the kept
    tokens, so >= the recompute at T (and > for some token, else the cut would not have been applied)."""
    rollout_service.sync_weights(trained_policy)
    completions = rollout_service.generate(eval_prompts[:3], sampling)
    assert [(c.prompt_index, c.sample_index) for c in completions] == [
        (p, s) for p in range(3) for s in range(sampling.n)
    ]
    recorded = torch.cat([torch.tensor(c.logprobs) for c in completions])
    at_temperature = torch.cat(
        [
            recomputed_logprobs(trained_policy, c.prompt_token_ids, c.token_ids, sampling.temperature)
            for c in completions
        ]
    )
    at_one = torch.cat([recomputed_logprobs(trained_policy, c.prompt_token_ids, c.token_ids, 1.0) for c in completions])
    if sampling.top_k:
        assert (recorded - at_temperature).min() > -LOGPROB_ATOL and (recorded - at_temperature).max() > 1e-3
    else:
        torch.testing.assert_close(recorded, at_temperature, atol=LOGPROB_ATOL, rtol=0)
        assert (recorded - at_one).abs().max() > 0.01  # the temperature really is in the returned values
    again = rollout_service.generate(eval_prompts[:3], sampling)
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]  # seeded requests reproduce
    assert len({tuple(c.token_ids) for c in completions}) > 1


@pytest.mark.parametrize("policy", ["trained", "untrained"])
def test_texts_without_vllms_detokenizer_equal_its_own(rollout_service, tiny_tokenizer, trained_policy, eval_prompts,
                                                       policy):  # fmt: skip
    """Without stop strings the engine runs with detokenize=False and the backend decodes the finished ids
    (`completion_text`); a stop string that never matches turns vLLM's incremental detokenizer on for the same
    seeded samples. Texts equal, also for samples ended by a stop token id (left out of the text) and by length."""
    model = trained_policy if policy == "trained" else tiny_policy(tiny_tokenizer, seed=5)
    rollout_service.sync_weights(model)
    plain_token = tiny_tokenizer.encode("1", add_special_tokens=False)[0]
    sampling = SamplingConfig(temperature=1.0, n=4, seed=13, max_tokens=8, stop_token_ids=[plain_token])
    detokenized = dataclasses.replace(sampling, stop=["\x00never"])
    backend = rollout_service.backend
    assert not backend.sampling_params(sampling, 0).detokenize and backend.sampling_params(detokenized, 0).detokenize
    ours, vllms = rollout_service.generate(eval_prompts, sampling), rollout_service.generate(eval_prompts, detokenized)
    assert [c.token_ids for c in ours] == [c.token_ids for c in vllms]
    assert [(c.text, c.finish_reason) for c in ours] == [(c.text, c.finish_reason) for c in vllms]
    reasons = {c.finish_reason for c in ours}
    assert reasons == {"stop", "length"}, reasons  # both endings are compared
    assert any(c.token_ids[-1] == plain_token and c.text for c in ours if c.finish_reason == "stop")


def _stop_cases(tokenizer, reference_completion):
    return {
        "max_tokens": SamplingConfig(temperature=0.0, max_tokens=5),
        "stop_string": SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS, stop=[" ="]),
        "stop_token_id": SamplingConfig(
            temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[reference_completion[2]]
        ),
        "ignore_eos": SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
    }


@pytest.mark.parametrize("case", ["max_tokens", "stop_string", "stop_token_id", "ignore_eos"])
def test_hf_backend_returns_the_same_completions(
    rollout_service, hf_rollout_service, tiny_tokenizer, trained_policy, eval_prompts, case
):
    """rollout=hf is a drop-in: same ids, text, finish reason and log-probs as vLLM, including stop handling."""
    rollout_service.sync_weights(trained_policy)
    hf_rollout_service.sync_weights(trained_policy)
    reference = reference_greedy(
        trained_policy, prompt_ids(tiny_tokenizer, eval_prompts[:1]), MAX_TOKENS, tiny_tokenizer.eos_token_id
    )[0]
    sampling = _stop_cases(tiny_tokenizer, reference)[case]
    from_vllm = rollout_service.generate(eval_prompts, sampling)
    from_hf = hf_rollout_service.generate(eval_prompts, sampling)
    assert [(c.token_ids, c.text, c.finish_reason) for c in from_hf] == [
        (c.token_ids, c.text, c.finish_reason) for c in from_vllm
    ]
    for a, b in zip(from_vllm, from_hf):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=LOGPROB_ATOL, rtol=0)
    expected_reason = {"max_tokens": "length", "stop_string": "stop", "stop_token_id": "stop", "ignore_eos": "length"}[
        case
    ]
    assert from_vllm[0].finish_reason == expected_reason
    if case == "stop_string":
        assert all(" =" not in c.text for c in from_vllm) and " =" in tiny_tokenizer.decode(from_vllm[0].token_ids)


def test_token_id_prompts_equal_chat_prompts(rollout_service, tiny_tokenizer, trained_policy, eval_prompts):
    rollout_service.sync_weights(trained_policy)
    as_chat = rollout_service.generate(eval_prompts[:2], GREEDY)
    as_ids = rollout_service.generate(prompt_ids(tiny_tokenizer, eval_prompts[:2]), GREEDY)
    assert [c.token_ids for c in as_ids] == [c.token_ids for c in as_chat]


def test_long_prompts_error_or_are_left_truncated(rollout_service, tiny_tokenizer):
    too_long = [1] + [200] * 500  # 501 + 24 new tokens > max_model_len 512
    with pytest.raises(
        DataError, match="prompt 1 has 501 tokens; with max_tokens=24 it needs 525 > rollout.max_model_len=512"
    ):
        rollout_service.generate([[1, 2, 3], too_long], GREEDY)
    left = RolloutService(
        rollout_service.backend, tiny_tokenizer, dataclasses.replace(rollout_service.cfg, prompt_truncation="left")
    )
    completion = left.generate([too_long], SamplingConfig(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert completion.prompt_token_ids == too_long[-488:] and len(completion.token_ids) == 24


def test_engine_start_failure_is_a_config_error(rollout_service, tiny_tokenizer, tmp_path):
    """vLLM's own start-up errors come back as ConfigError with the cause (here a too-long max_model_len)."""
    from rollout_helpers import save_policy_dir

    from posttrain.errors import ConfigError
    from posttrain.rollout import RolloutConfig, build_rollout_service

    model_dir = save_policy_dir(tiny_policy(tiny_tokenizer), tiny_tokenizer, tmp_path / "policy")
    with pytest.raises(ConfigError, match="vLLM could not start an engine .*max_model_len"):
        build_rollout_service(RolloutConfig(max_model_len=1_000_000), model_dir, tiny_tokenizer)


def test_seeded_requests_with_more_prompt_tokens_than_one_step_holds(rollout_service, tiny_tokenizer):
    """64 seeded prompts of 100 tokens are 6,400 prefill tokens, over vLLM's 4,096-token step budget on CPU. With
    chunked prefill (vLLM's default) the prompt cut at the budget had its sample discarded and its CPU generator
    rewound, which CPU generators cannot do: the engine crashed ("CPU Generator does not use offset"; the demo's RLVR
    stage did). On CPU posttrain turns chunked prefill off: every prompt is prefilled whole."""
    rollout_service.sync_weights(tiny_policy(tiny_tokenizer))
    prompts = [[5 + (index + position) % 50 for position in range(100)] for index in range(64)]
    sampling = SamplingConfig(temperature=1.0, n=1, seed=11, max_tokens=2)
    completions = rollout_service.generate(prompts, sampling)
    assert [c.prompt_index for c in completions] == list(range(64))
    assert all(len(c.token_ids) >= 1 for c in completions)
    again = rollout_service.generate(prompts, sampling)
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]  # seeded: the same samples
