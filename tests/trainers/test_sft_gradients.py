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


def test_loss_fused_kernel_gives_the_per_token_path_loss_and_gradients(tiny_model, tiny_tokenizer, arithmetic_rows):
    """The SFT trainer's two paths on one micro-batch, in float32: the loss-fused cross-entropy (summed NLL with
    the target mask as token weights, times `sft_loss_scale`, gradients formed in the forward and scaled by the
    upstream gradient) against per-token log-probs from the plain reference + `sft_loss`. Upstream 0.5 stands in
    for a token-budget micro-batch's share of the step."""
    from posttrain.losses.sft import sft_loss_scale
    from posttrain.ops import fused_kernel_available

    assert fused_kernel_available("cpu"), "the compiled kernel must build for this comparison to mean anything"
    examples = [tokenize_conversation(tiny_tokenizer, row["messages"]) for row in arithmetic_rows[:6]]
    batch = collate(examples, False, tiny_tokenizer.pad_token_id)
    targets = batch.pop("targets")
    mask = (targets != IGNORE_INDEX).float()
    step_tokens = 3 * count_target_tokens(examples)  # as if this were one of three micro-batches
    results = {}
    for name, fused in (("plain", False), ("fused", True)):
        module = CausalLMWithLogprobs(tiny_model, fused=fused)
        module.zero_grad()
        if fused:
            nll_sum = module(targets=targets, token_weights=mask, **batch)
            loss = nll_sum * sft_loss_scale(step_target_tokens=step_tokens, world_size=2)
        else:
            logprobs, _ = module(targets=targets, **batch)
            loss, parts = sft_loss(logprobs, mask, step_target_tokens=step_tokens, world_size=2)
            nll_sum = parts["nll_sum"]
        (loss * 0.5).backward()
        results[name] = (
            float(nll_sum.detach()),
            float(loss.detach()),
            {n: p.grad.clone() for n, p in module.named_parameters()},
        )
    (plain_nll, plain_loss, plain_grads), (fused_nll, fused_loss, fused_grads) = results["plain"], results["fused"]
    assert abs(fused_nll - plain_nll) <= 1e-5 * abs(plain_nll) and abs(fused_loss - plain_loss) <= 1e-5 * plain_loss
    assert plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert plain_grads["policy.lm_head.weight"].abs().sum() > 0
