"""A packed row that holds each prompt once for all its completions (`collate_shared_prompts`,
`shared_prompt_attention`): the decoder states, log-probs, entropies and gradients equal those of every
prompt + completion run as its own sequence (the reference: the plain packed path, float64 where exact)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.data.chat import IGNORE_INDEX, TokenizedExample
from posttrain.models.attention import PACKED_SDPA, decoder_hidden_states, use_packed_sdpa
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.logprobs import collate_shared_prompts, completion_logprobs


def rl_example(prompt: list[int], completion: list[int]) -> TokenizedExample:
    return TokenizedExample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def test_collate_puts_each_prompt_once_and_predicts_first_tokens_from_its_last_position():
    examples = [
        rl_example([5, 6], [7, 8]),
        rl_example([3], [4]),
        rl_example([5, 6], [9]),
        rl_example([5, 6], [10, 11, 12]),
    ]
    inputs, spans = collate_shared_prompts(examples, [2, 1, 2, 2])
    # Row: prompt [5, 6], its completions [7, 8], [9], [10, 11, 12]; then prompt [3] and [4].
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 3, 4]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 2, 2, 3, 4, 0, 1]]
    assert inputs["prompt_groups"] == [(2, (2, 1, 3)), (1, (1,))]
    # Targets in the order the completions sit in the row, each predicted from the position before it, the
    # first of each completion from its prompt's last position (1 for the first prompt, 8 for the second).
    assert inputs["targets"].tolist() == [7, 8, 9, 10, 11, 12, 4]
    assert inputs["target_positions"].tolist() == [1, 2, 1, 1, 5, 6, 8]
    assert spans == [(0, 2), (6, 1), (2, 1), (3, 3)]


def test_collate_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match="example 0 has an empty prompt"):
        collate_shared_prompts([rl_example([], [4, 5])], [0])


def tiny_lm(kind: str = "llama", heads: int = 4, kv_heads: int = 2, dtype=torch.float64):
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=128, attn_implementation="sdpa",
    )  # fmt: skip
    config, model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    return use_packed_sdpa(model(config(**sizes)).to(dtype))


def random_groups(prompt_lengths, completion_lengths, seed=1):
    """Examples: for each prompt length, one random prompt shared by completions of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    examples, prompts = [], []
    for prompt_length, lengths in zip(prompt_lengths, completion_lengths):
        prompt = torch.randint(1, 64, (prompt_length,), generator=generator).tolist()
        for length in lengths:
            examples.append(rl_example(prompt, torch.randint(1, 64, (length,), generator=generator).tolist()))
            prompts.append(prompt_length)
    return examples, prompts


@pytest.mark.parametrize(
    ("kind", "heads", "kv_heads", "prompt_lengths", "completion_lengths", "checkpointing"),
    [
        ("llama", 4, 2, [5, 3], [[7, 1, 4], [2, 9]], False),  # grouped-query heads, a 1-token completion
        ("llama", 4, 4, [6], [[3, 3, 3, 3]], True),  # checkpointing recomputes attention in the backward
        ("qwen2", 4, 1, [4, 1, 2], [[5], [6, 2], [1, 1, 8]], False),  # q/k/v biases; a one-token prompt
        ("llama", 4, 2, [4, 3], [[0, 5], [0]], False),  # empty completions: the prompt alone
    ],
)
def test_shared_row_states_and_gradients_equal_each_sequence_on_its_own(
    kind, heads, kv_heads, prompt_lengths, completion_lengths, checkpointing
):
    decoder = tiny_lm(kind, heads, kv_heads).get_decoder()
    assert decoder.config._attn_implementation == PACKED_SDPA
    if checkpointing:
        decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decoder.train()  # dropout is 0: train mode only exercises the checkpointed path
    examples, prompts = random_groups(prompt_lengths, completion_lengths)
    inputs, _ = collate_shared_prompts(examples, prompts)
    weights = torch.randn(inputs["input_ids"].shape[1], 32, generator=torch.Generator().manual_seed(2))

    decoder.zero_grad()
    shared = decoder_hidden_states(
        decoder, inputs["input_ids"], inputs["position_ids"], prompt_groups=inputs["prompt_groups"]
    )[0]
    # A loss on the completions' states (what RL trains); the prompt's states enter it only through attention.
    # Reference: each prompt + completion through the decoder alone, its completion states under the same weights.
    completion = torch.ones(shared.shape[0], dtype=torch.bool)
    offset = 0
    for prompt, lengths in inputs["prompt_groups"]:
        completion[offset : offset + prompt] = False
        offset += prompt + sum(lengths)
    (shared[completion] * weights[completion]).sum().backward()
    shared_grads = [parameter.grad.clone() for parameter in decoder.parameters()]

    decoder.zero_grad()
    reference_states = torch.zeros_like(shared)
    offset, index, total = 0, 0, 0
    for prompt, lengths in inputs["prompt_groups"]:
        prompt_states = None
        start = offset + prompt
        for length in lengths:
            ids = torch.tensor([examples[index].input_ids])
            states = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
            prompt_states = states[:prompt] if prompt_states is None else prompt_states
            assert torch.allclose(states[:prompt], prompt_states, atol=1e-12)
            reference_states[start : start + length] = states[prompt:].detach()
            total = total + (states[prompt:] * weights[start : start + length]).sum()
            start += length
            index += 1
        reference_states[offset : offset + prompt] = prompt_states.detach()
        offset = start
    total.backward()
    assert torch.equal(shared.detach(), reference_states)  # token by token the same arithmetic
    # The gradients differ only by float32 rounding: transformers' RMSNorm computes in float32 even in a float64
    # model, and a prompt position's gradient is summed over its completions before the norm's backward here,
    # after it in the reference (measured: <= 6e-8 of the largest entry; a prompt value cut off from its
    # gradient fails this).
    for got, want in zip(shared_grads, (parameter.grad for parameter in decoder.parameters())):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def logprobs_and_grads(model, examples, prompts, share_prompts):
    model.zero_grad()
    logprobs, entropy, mask = completion_logprobs(model, examples, prompts, 0.7, share_prompts)
    weights = torch.linspace(-1.0, 1.0, logprobs.numel()).view_as(logprobs).to(logprobs.dtype)
    ((logprobs * weights).sum() + 0.3 * (entropy * mask).sum()).backward()
    grads = [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]
    return logprobs.detach(), entropy.detach(), mask, grads


@pytest.mark.parametrize("fused", [True, False])
def test_completion_logprobs_with_shared_prompts_equal_the_plain_packed_forward(fused):
    # The fused kernel is float32 only: compare in float32 at rounding tolerance; the plain head in float64.
    dtype = torch.float32 if fused else torch.float64
    model = CausalLMWithLogprobs(tiny_lm(dtype=dtype), fused=fused)
    assert model.shares_prompts
    # Groups interleaved on purpose: the collate gathers each prompt's completions, the rows keep input order.
    examples, prompts = random_groups([6, 4, 6], [[3, 8], [5, 1, 2], [4]])
    order = [0, 2, 1, 5, 3, 4]
    examples, prompts = [examples[i] for i in order], [prompts[i] for i in order]
    plain = logprobs_and_grads(model, examples, prompts, share_prompts=False)
    shared = logprobs_and_grads(model, examples, prompts, share_prompts=True)
    # float32: the two forwards' GEMMs sum in different orders; float64: as exact as the RMSNorm allows (above).
    tolerance = 1e-5 if fused else 1e-6
    assert torch.equal(plain[2], shared[2])
    assert (plain[0] - shared[0]).abs().max() <= tolerance * plain[0].abs().max()
    assert (plain[1] - shared[1]).abs().max() <= tolerance * plain[1].abs().max()
    assert len(plain[3]) == len(shared[3]) > 0
    for want, got in zip(plain[3], shared[3]):
        assert (want - got).abs().max() <= tolerance * want.abs().max()


def test_a_model_without_the_split_attention_does_not_share_prompts():
    model = CausalLMWithLogprobs(LlamaForCausalLM(LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        attn_implementation="eager",
    )))  # fmt: skip
    assert not model.shares_prompts
    examples = [rl_example([1, 2, 3], [4, 5]), rl_example([1, 2, 3], [6, 7])]
    with pytest.raises(ValueError, match="prompt_groups need one packed row"):
        completion_logprobs(model, examples, [3, 3], share_prompts=True)
