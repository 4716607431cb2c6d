"""No-grad scoring passes under train.max_tokens_per_micro_batch: RLVR's old and reference log-probs
(`completion_logprob_rows`), GPO's and DNO's pair log-probs (`pair_logprob_rows`) and the DPO reference cache
(`compute_reference_logprobs`) give the numbers of fixed-count batches, and no forward holds more than the budget."""

import random

import pytest
import torch

from posttrain.data.chat import IGNORE_INDEX, TokenizedExample, render_ids
from posttrain.data.preference import PreferenceExample
from posttrain.engine.reference import compute_reference_logprobs
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.logprobs import completion_logprob_rows, pair_logprob_rows, scoring_batches


def completions(tokenizer, rows) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each row's demonstration."""
    out = []
    for row in rows:
        prompt = render_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        answer = tokenizer(row["messages"][-1]["content"] + "<|end|>", add_special_tokens=False)["input_ids"]
        out.append((prompt, answer))
    return out


def example(prompt, answer) -> TokenizedExample:
    return TokenizedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def recorded_forward_tokens(module) -> list[int]:
    """Token counts (input_ids.numel(): padding included) of every forward `module` runs from now on."""
    tokens, forward = [], module.forward

    def counting(input_ids, *args, **kwargs):
        tokens.append(input_ids.numel())
        return forward(input_ids, *args, **kwargs)

    module.forward = counting
    return tokens


@pytest.mark.parametrize("padded", [False, True])
def test_scoring_batches_hold_every_item_once_within_the_budget(padded):
    rng = random.Random(0)
    sizes = [[rng.randint(5, 40) for _ in range(rng.choice([1, 2]))] for _ in range(50)]
    assert scoring_batches(sizes, 4, None, padded) == [list(range(s, min(s + 4, 50))) for s in range(0, 50, 4)]
    batches = scoring_batches(sizes, 4, 100, padded)
    assert sorted(p for batch in batches for p in batch) == list(range(50))
    for batch in batches:
        lengths = [n for p in batch for n in sizes[p]]
        assert (len(lengths) * max(lengths) if padded else sum(lengths)) <= 100, batch
    assert max(len(batch) for batch in batches) > 4  # the budget, not micro_batch_size, sets the size
    with pytest.raises(ValueError, match="micro_batch_size"):
        scoring_batches(sizes, 0, None, padded)


def test_completion_rows_under_a_budget_equal_fixed_batches(tiny_model, tiny_tokenizer, arithmetic_rows):
    pairs = completions(tiny_tokenizer, arithmetic_rows[:12])
    examples, prompts = [example(p, a) for p, a in pairs], [len(p) for p, _ in pairs]
    module = CausalLMWithLogprobs(tiny_model, fused=False).eval()
    fixed = completion_logprob_rows(module, examples, prompts, micro_batch_size=3)
    budget = 2 * max(len(e.input_ids) for e in examples) + 5
    tokens = recorded_forward_tokens(module)
    budgeted = completion_logprob_rows(module, examples, prompts, micro_batch_size=3, max_tokens=budget)
    assert 1 < len(tokens) < 12 and max(tokens) <= budget, (tokens, budget)
    assert sum(tokens) == sum(len(e.input_ids) for e in examples)  # packed: no padding, each completion once
    for index, (want, got) in enumerate(zip(fixed, budgeted)):
        assert got.shape == want.shape == (len(pairs[index][1]),), index
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packing", [True, False])
def test_pair_rows_and_the_reference_cache_under_a_budget_equal_fixed_batches(
    packing, tiny_model, tiny_tokenizer, arithmetic_rows
):
    pairs = completions(tiny_tokenizer, arithmetic_rows[:11])
    # Chosen: the row's own answer; rejected: the next row's answer to the same prompt.
    examples = [
        PreferenceExample(example(prompt, answer), example(prompt, pairs[(i + 1) % len(pairs)][1]), len(prompt))
        for i, (prompt, answer) in enumerate(pairs)
    ]
    module = CausalLMWithLogprobs(tiny_model, fused=False).eval()
    pad = tiny_tokenizer.pad_token_id
    fixed = pair_logprob_rows(module, examples, 3, packing, pad)
    fixed_cache = compute_reference_logprobs(module, examples, 3, packing, pad, "cpu")
    longest = max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in examples)
    budget = (12 if packing else 6) * longest  # padded: 3 pairs (6 rows of the longest); packed: ~2x more
    tokens = recorded_forward_tokens(module)
    budgeted = pair_logprob_rows(module, examples, 3, packing, pad, max_tokens=budget)
    budgeted_cache = compute_reference_logprobs(module, examples, 3, packing, pad, "cpu", max_tokens=budget)
    assert max(tokens) <= budget and len(tokens) >= 2, (tokens, budget)
    if packing:  # packed forwards hold more than micro_batch_size pairs when they fit
        assert len(tokens) < 2 * 4, tokens  # fixed: 4 forwards a pass (11 pairs, 3 a forward)
    for want, got in zip(
        (*fixed, fixed_cache.chosen, fixed_cache.rejected), (*budgeted, budgeted_cache.chosen, budgeted_cache.rejected)
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fixed_cache.chosen, fixed[0], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(fixed[0], fixed[1])  # the two responses do differ
