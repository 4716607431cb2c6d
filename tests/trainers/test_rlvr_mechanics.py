"""RLVR trainer mechanics: completion log-prob alignment, chunked accumulation, group filtering."""

import pytest
import torch

from posttrain.data.batching import split_evenly
from posttrain.data.chat import IGNORE_INDEX, TokenizedExample, render_ids
from posttrain.losses import POLICY_LOSSES
from posttrain.losses.policy import chunk_loss_weight, group_advantages
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.logprobs import completion_logprob_rows, completion_logprobs, padded_rows
from posttrain.rollout.completion import Completion
from posttrain.rollout.samples import PolicySample, policy_samples


def logprobs_of(model, samples, temperature=1.0):
    return completion_logprobs(model, [s.example for s in samples], [s.prompt_length for s in samples], temperature)


def make_sequences(tokenizer, rows, advantages):
    sequences = []
    for row, advantage in zip(rows, advantages):
        prompt = render_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        completion = tokenizer(row["messages"][-1]["content"] + "<|end|>", add_special_tokens=False)["input_ids"]
        labels = [IGNORE_INDEX] * len(prompt) + completion
        sequences.append(PolicySample(TokenizedExample(prompt + completion, labels), len(prompt), advantage))
    return sequences


def test_completion_logprobs_align_with_a_plain_forward(tiny_model, tiny_tokenizer, arithmetic_rows):
    sequences = make_sequences(tiny_tokenizer, arithmetic_rows[:3], [1.0, -1.0, 0.5])
    module = CausalLMWithLogprobs(tiny_model, fused=False).eval()
    with torch.no_grad():
        logprobs, _, mask = logprobs_of(module, sequences)
        for row, sequence in enumerate(sequences):
            ids = torch.tensor([sequence.example.input_ids])
            full = torch.log_softmax(tiny_model(input_ids=ids).logits[0].float(), -1)
            completion = ids[0, sequence.prompt_length :]
            expected = full[sequence.prompt_length - 1 : -1].gather(-1, completion[:, None])[:, 0]
            assert int(mask[row].sum()) == len(completion)
            torch.testing.assert_close(logprobs[row, : len(completion)], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "sum_constant"])
def test_chunked_accumulation_equals_one_pass(aggregation, tiny_model, tiny_tokenizer, arithmetic_rows):
    """Summing chunk_loss_weight-weighted chunk losses gives the gradient of the whole minibatch's loss."""
    sequences = make_sequences(tiny_tokenizer, arithmetic_rows[:6], [1.0, -0.5, 0.25, -1.0, 2.0, -0.75])
    module = CausalLMWithLogprobs(tiny_model, fused=False)
    with torch.no_grad():
        old, _, _ = logprobs_of(module, sequences)
    old = old - 0.05  # ratios away from 1 so clipping and ratios matter
    index = {id(s): i for i, s in enumerate(sequences)}
    kwargs = dict(clip_low=0.2, clip_high=0.28, aggregation=aggregation, constant_normalizer=64.0 * len(sequences))

    def loss_of(part):
        logprobs, _, mask = logprobs_of(module, part)
        rows = torch.stack([old[index[id(s)]] for s in part])[:, : mask.shape[1]]
        loss, _ = POLICY_LOSSES.get("grpo")(
            logprobs, rows * mask, torch.tensor([s.advantage for s in part]), mask, **kwargs
        )
        return loss, float(mask.sum())

    module.zero_grad()
    loss_of(sequences)[0].backward()
    whole = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    total_tokens = float(sum(len(s.example.input_ids) - s.prompt_length for s in sequences))
    for chunk in split_evenly(sequences, 3):
        loss, chunk_tokens = loss_of(chunk)
        weight = chunk_loss_weight(aggregation, len(chunk), chunk_tokens, float(len(sequences)), total_tokens, 1)
        (loss * weight).backward()
    for expected, parameter in zip(whole, module.parameters()):
        torch.testing.assert_close(parameter.grad, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["token_mean", "sum_constant"])
def test_detached_own_logprobs_give_the_recomputed_old_logprobs_gradient(
    aggregation, tiny_model, tiny_tokenizer, arithmetic_rows
):
    """With one optimizer step per batch the trainer skips the old-log-prob forward and uses the step's own
    log-probs, detached: loss, gradient and clip fraction equal those with the old log-probs recomputed."""
    sequences = make_sequences(tiny_tokenizer, arithmetic_rows[:4], [1.0, -0.5, 0.25, -1.0])
    module = CausalLMWithLogprobs(tiny_model, fused=False)
    kwargs = dict(clip_low=0.2, clip_high=0.28, aggregation=aggregation, constant_normalizer=64.0 * len(sequences))
    advantages = torch.tensor([s.advantage for s in sequences])
    examples, prompts = [s.example for s in sequences], [s.prompt_length for s in sequences]
    recomputed = completion_logprob_rows(module.eval(), examples, prompts, micro_batch_size=3)  # the trainer's
    module.train()
    results = []
    for old in (recomputed, None):
        module.zero_grad()
        logprobs, _, mask = logprobs_of(module, sequences)
        old_rows = logprobs.detach() if old is None else padded_rows(old, mask)  # as RLVR.optimizer_step does
        loss, parts = POLICY_LOSSES.get("grpo")(logprobs, old_rows, advantages, mask, **kwargs)
        loss.backward()
        results.append((loss.detach(), float(parts["clip_fraction"]), [p.grad.clone() for p in module.parameters()]))
    (loss_a, clip_a, grads_a), (loss_b, clip_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    assert clip_a == clip_b == 0.0
    assert any(float(g.abs().sum()) > 0 for g in grads_b)
    for expected, actual in zip(grads_a, grads_b):
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_chunks_are_exact_and_may_be_empty():
    assert split_evenly(list(range(5)), 3) == [[0, 1], [2, 3], [4]]
    assert split_evenly([1], 3) == [[1], [], []]


def test_zero_variance_groups_are_dropped_before_training():
    rewards = torch.tensor([[10.0, 10.0, 10.0], [0.0, 10.0, 0.0]])  # prompt 0: all verified, no signal
    advantages, keep = group_advantages(rewards, mode="standard")
    completions = [Completion(p, s, [1, 2], [3, 4], "x", [0.0, 0.0], "stop") for p in range(2) for s in range(3)]
    sequences = policy_samples(completions, advantages, keep)
    assert len(sequences) == 3
    assert sorted(s.advantage for s in sequences) == pytest.approx(sorted(advantages[1].tolist()))
    assert all(s.example.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX] for s in sequences)
