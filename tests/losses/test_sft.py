"""The SFT loss: hand-derived values and the token-weighted reduction across micro-batches."""

import pytest
import torch

from posttrain.losses.sft import sft_loss


def test_token_mean_divides_by_step_tokens():
    """logprobs [-1, -2, -3] with mask [1, 1, 0]: NLL sum = 1 + 2 = 3; 6 target tokens in the step
    -> loss = 3 / 6 = 0.5 (world size 1); with world size 2 the loss doubles to 1.0 so DeepSpeed's
    mean over ranks gives back the step's token mean."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, parts = sft_loss(logprobs, mask, step_target_tokens=6)
    assert loss.item() == pytest.approx(0.5)
    assert parts["nll_sum"].item() == pytest.approx(3.0)
    loss2, _ = sft_loss(logprobs, mask, step_target_tokens=6, world_size=2)
    assert loss2.item() == pytest.approx(1.0)


def test_sum_reduction_is_the_summed_nll():
    """Same tokens, reduction=sum: loss = 1 + 2 = 3 regardless of the step's token count."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = sft_loss(logprobs, mask, step_target_tokens=100, reduction="sum")
    assert loss.item() == pytest.approx(3.0)


def test_micro_batch_split_gives_the_same_gradient():
    """Gradients summed over micro-batches of uneven token counts equal the whole batch's token mean
    (a per-micro-batch mean would weight the short micro-batch's tokens more)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    step_tokens = int(mask.sum())
    whole, _ = sft_loss(torch.log_softmax(logits, -1), mask, step_target_tokens=step_tokens)
    (whole_grad,) = torch.autograd.grad(whole, logits)
    split_grad = torch.zeros_like(logits)
    for row in range(2):
        part, _ = sft_loss(
            torch.log_softmax(logits, -1)[row : row + 1], mask[row : row + 1], step_target_tokens=step_tokens
        )
        split_grad += torch.autograd.grad(part, logits)[0]
    torch.testing.assert_close(split_grad, whole_grad)
    # The per-micro-batch mean (the trap in REFERENCE.md) does not match.
    naive = sum(
        torch.autograd.grad(-(torch.log_softmax(logits, -1)[r] * mask[r]).sum() / mask[r].sum() / 2, logits)[0]
        for r in range(2)
    )
    assert not torch.allclose(naive, whole_grad)


def test_unknown_reduction_names_the_known_ones():
    with pytest.raises(ValueError, match="token_mean, sum"):
        sft_loss(torch.zeros(1, 1), torch.ones(1, 1), step_target_tokens=1, reduction="mean")
