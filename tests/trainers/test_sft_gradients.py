"""Accumulated SFT gradients do not depend on how a step is split into micro-batches."""

import torch

from posttrain.data.batching import StepPlan, collate, count_target_tokens
from posttrain.data.chat import IGNORE_INDEX, tokenize_conversation
from posttrain.losses.sft import sft_loss
from posttrain.models.logprob_model import CausalLMWithLogprobs


def accumulated_gradients(module, examples, plan, packing, pad_token_id, reduction="token_mean"):
    module.zero_grad()
    step_tokens = count_target_tokens([examples[i] for i in plan.step_indices(0)])
    for indices in plan.micro_batches(0, rank=0):
        batch = collate([examples[i] for i in indices], packing, pad_token_id)
        targets = batch.pop("targets")
        logprobs, _ = module(targets=targets, **batch)
        loss, _ = sft_loss(
            logprobs, (targets != IGNORE_INDEX).float(), step_target_tokens=step_tokens, reduction=reduction
        )
        loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_micro_batch_split_does_not_change_the_gradient(tiny_model, tiny_tokenizer, arithmetic_rows):
    examples = [tokenize_conversation(tiny_tokenizer, row["messages"]) for row in arithmetic_rows[:64]]
    module = CausalLMWithLogprobs(tiny_model, fused=False)
    pad = tiny_tokenizer.pad_token_id
    one_by_eight = accumulated_gradients(module, examples, StepPlan(1, 8, 1, 64, seed=0), True, pad)
    eight_by_one = accumulated_gradients(module, examples, StepPlan(8, 1, 1, 64, seed=0), True, pad)
    four_by_two_padded = accumulated_gradients(module, examples, StepPlan(4, 2, 1, 64, seed=0), False, pad)
    for name, grad in eight_by_one.items():
        torch.testing.assert_close(one_by_eight[name], grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(four_by_two_padded[name], grad, atol=1e-6, rtol=1e-5)
    # The summed reduction scales the same gradient by the step's target-token count.
    summed = accumulated_gradients(module, examples, StepPlan(8, 1, 1, 64, seed=0), True, pad, reduction="sum")
    step_tokens = count_target_tokens([examples[i] for i in StepPlan(8, 1, 1, 64, seed=0).step_indices(0)])
    name = "policy.model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(summed[name] / step_tokens, eight_by_one[name], atol=1e-6, rtol=1e-5)
