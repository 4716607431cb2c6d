"""Distillation divergences against hand-derived values and a plain float64 reference, gradients included."""

import math

import pytest
import torch
from helpers import t

from posttrain.errors import ConfigError
from posttrain.losses import DIVERGENCES, PAIR_LOSSES
from posttrain.losses.distill import (
    chunked_vocab_divergence,
    forward_kl,
    full_vocab_divergence,
    generalized_jsd,
    reverse_kl,
    sampled_reverse_kl,
)


def reference_probs(logits):
    """softmax in float64 written out: exp(z - max) / sum exp(z - max)."""
    shifted = logits.double() - logits.double().max(-1, keepdim=True).values
    return shifted.exp() / shifted.exp().sum(-1, keepdim=True)


def reference_kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def reference_divergence(name, student_logits, teacher_logits, beta=0.5):
    p_s, p_t = reference_probs(student_logits), reference_probs(teacher_logits)
    if name == "forward_kl":
        return reference_kl(p_t, p_s)
    if name == "reverse_kl":
        return reference_kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * reference_kl(p_t, m) + (1 - beta) * reference_kl(p_s, m)


def test_registry_holds_the_four_divergences_and_says_what_each_needs():
    assert DIVERGENCES.names() == ["forward_kl", "jsd", "reverse_kl", "sampled_reverse_kl"]
    assert [DIVERGENCES.get(n).full_vocab for n in DIVERGENCES.names()] == [True, True, True, False]
    assert full_vocab_divergence("jsd").fn is generalized_jsd
    assert full_vocab_divergence("sampled_reverse_kl").fn is reverse_kl  # the exact quantity it estimates
    with pytest.raises(ConfigError, match="algo.divergence='dpo': 'dpo' is a preference-pair loss"):
        DIVERGENCES.get("dpo", "algo.divergence")
    assert "dpo" in PAIR_LOSSES


def test_hand_values_two_token_vocabulary():
    """Teacher z = [0, 0]: p_t = [1/2, 1/2]. Student z = [log 3, 0]: p_s = [3/4, 1/4].
    forward KL(p_t || p_s) = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3)                       = 0.143841
    reverse KL(p_s || p_t) = 3/4 log(3/2) + 1/4 log(1/2)                                 = 0.130812
    JSD(1/2): m = [5/8, 3/8]; KL(p_t || m) = 1/2 log(4/5) + 1/2 log(4/3) = 1/2 log(16/15),
              KL(p_s || m) = 3/4 log(6/5) + 1/4 log(2/3);  JSD = (sum) / 2                = 0.033822
    JSD(1/4): m = 1/4 p_t + 3/4 p_s = [11/16, 5/16];
              1/4 [1/2 log(8/11) + 1/2 log(8/5)] + 3/4 [3/4 log(12/11) + 1/4 log(4/5)]."""
    student, teacher = t([math.log(3.0), 0.0]), t([0.0, 0.0])
    forward = 0.5 * math.log(4 / 3)
    reverse = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    jsd_half = 0.5 * (0.5 * math.log(16 / 15) + 0.75 * math.log(1.2) + 0.25 * math.log(2 / 3))
    jsd_quarter = 0.25 * (0.5 * math.log(8 / 11) + 0.5 * math.log(8 / 5)) + 0.75 * (
        0.75 * math.log(12 / 11) + 0.25 * math.log(4 / 5)
    )
    torch.testing.assert_close(forward_kl(student, teacher), t(forward))
    torch.testing.assert_close(reverse_kl(student, teacher), t(reverse))
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.5), t(jsd_half))
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.25), t(jsd_quarter))
    assert abs(forward - 0.143841) < 1e-6 and abs(reverse - 0.130812) < 1e-6 and abs(jsd_half - 0.033822) < 1e-6


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_values_and_gradients_match_the_float64_reference(name, beta):
    """Odd shape 3 x 47 (x 123 vocab): values and d/d(student logits), d/d(teacher logits)."""
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(3, 47, 123, generator=generator, dtype=torch.float64)).requires_grad_()
    teacher = (3 * torch.randn(3, 47, 123, generator=generator, dtype=torch.float64)).requires_grad_()
    fn = DIVERGENCES.get(name).fn
    ours = fn(student, teacher, beta=beta)
    weights = torch.rand(3, 47, generator=generator, dtype=torch.float64)
    grad_s, grad_t = torch.autograd.grad((ours * weights).sum(), (student, teacher))
    student_ref, teacher_ref = student.detach().clone().requires_grad_(), teacher.detach().clone().requires_grad_()
    expected = reference_divergence(name, student_ref, teacher_ref, beta)
    ref_s, ref_t = torch.autograd.grad((expected * weights).sum(), (student_ref, teacher_ref))
    assert ours.shape == (3, 47) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_t, ref_t, rtol=1e-9, atol=1e-12)
    assert (ours >= -1e-12).all()


def test_kl_gradients_have_their_closed_forms():
    """d KL(p_t || p_s) / d z_s = p_s - p_t;  d KL(p_s || p_t) / d z_s = p_s (log p_s - log p_t - KL(p_s || p_t))."""
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(5, 11, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(5, 11, generator=generator, dtype=torch.float64)
    p_s, p_t = reference_probs(student.detach()), reference_probs(teacher)
    (grad,) = torch.autograd.grad(forward_kl(student, teacher).sum(), student)
    torch.testing.assert_close(grad, p_s - p_t)
    (grad,) = torch.autograd.grad(reverse_kl(student, teacher).sum(), student)
    kl = reference_kl(p_s, p_t).unsqueeze(-1)
    torch.testing.assert_close(grad, p_s * (p_s.log() - p_t.log() - kl))


def test_jsd_limits_symmetry_and_bound():
    """JSD_b / b -> KL(p_t || p_s) as b -> 0 and JSD_b / (1 - b) -> KL(p_s || p_t) as b -> 1 (error O(b));
    JSD_1/2 is symmetric and at most log 2; zero for equal distributions."""
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    teacher = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    small = 1e-5
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=small) / small, forward_kl(student, teacher),
                               rtol=1e-3, atol=0.0)  # fmt: skip
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1 - small) / small,
                               reverse_kl(student, teacher), rtol=1e-3, atol=0.0)  # fmt: skip
    half = generalized_jsd(student, teacher, beta=0.5)
    torch.testing.assert_close(half, generalized_jsd(teacher, student, beta=0.5))
    far = generalized_jsd(t([[50.0, 0.0]]), t([[0.0, 50.0]]), beta=0.5)
    assert (half <= math.log(2)).all() and abs(float(far) - math.log(2)) < 1e-12
    torch.testing.assert_close(generalized_jsd(student, student, beta=0.3), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="0 < beta < 1"):
        generalized_jsd(student, teacher, beta=0.0)


def test_sampled_reverse_kl_value_gradient_and_expectation():
    """Value k1 = log p_s(y) - log p_t(y); d/d log p_s(y) = k1 (score function); nothing flows to the teacher.
    Exact expectation over y ~ p_s (enumerating the vocabulary, p_s(y) as a constant weight): the mean value is
    KL(p_s || p_t) and the mean gradient w.r.t. the student's logits is that of the exact reverse KL."""
    student_lp = t(-0.5, -2.0, -1.0, requires_grad=True)
    teacher_lp = t(-1.0, -1.0, -3.0, requires_grad=True)
    value = sampled_reverse_kl(student_lp, teacher_lp)
    torch.testing.assert_close(value, t(0.5, -1.0, 2.0))
    value.sum().backward()
    torch.testing.assert_close(student_lp.grad, t(0.5, -1.0, 2.0))
    assert teacher_lp.grad is None or torch.count_nonzero(teacher_lp.grad) == 0

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 13, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(4, 13, generator=generator, dtype=torch.float64)
    log_s, log_t = torch.log_softmax(logits, -1), torch.log_softmax(teacher, -1)
    per_token = sampled_reverse_kl(log_s.reshape(-1), log_t.reshape(-1)).view(4, 13)
    expectation = (log_s.detach().exp() * per_token).sum(-1)
    (grad,) = torch.autograd.grad(expectation.sum(), logits)
    exact = logits.detach().clone().requires_grad_()
    exact_kl = reference_divergence("reverse_kl", exact, teacher)
    (exact_grad,) = torch.autograd.grad(exact_kl.sum(), exact)
    torch.testing.assert_close(expectation.detach(), exact_kl.detach())
    torch.testing.assert_close(grad, exact_grad)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
def test_chunked_equals_unchunked_with_gradients(name, chunk_size):
    """N = 19 rows, H = 8, V = 37: chunked (checkpointed) values and gradients w.r.t. hidden, weight and bias equal
    the plain computation with the whole [N, V] student logits, and the float64 reference."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(19, 8, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(37, 8, generator=generator, dtype=torch.float64).requires_grad_()
    bias = torch.randn(37, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = 2 * torch.randn(19, 37, generator=generator, dtype=torch.float64)
    fn, temperature = DIVERGENCES.get(name).fn, 0.7
    chunked = chunked_vocab_divergence(hidden, weight, teacher, fn, beta=0.3, student_bias=bias,
                                       temperature=temperature, chunk_size=chunk_size)  # fmt: skip
    grads = torch.autograd.grad(chunked.sum(), (hidden, weight, bias))
    plain = reference_divergence(name, (hidden @ weight.t() + bias) / temperature, teacher, beta=0.3)
    plain_grads = torch.autograd.grad(plain.sum(), (hidden, weight, bias))
    torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=1e-12)
    for ours, expected in zip(grads, plain_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_chunked_float32_and_shape_checks():
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 8, generator=generator).requires_grad_()
    weight = torch.randn(10, 8, generator=generator).requires_grad_()
    teacher = torch.randn(6, 10, generator=generator)
    out = chunked_vocab_divergence(hidden, weight, teacher, forward_kl, chunk_size=4)
    assert out.dtype == torch.float32 and out.shape == (6,)
    torch.testing.assert_close(out.double(), reference_divergence("forward_kl", hidden @ weight.t(), teacher),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="one shared tokenizer"):
        chunked_vocab_divergence(hidden, weight, torch.randn(6, 11), forward_kl)
    with pytest.raises(ValueError, match="6 student rows but 5 teacher rows"):
        chunked_vocab_divergence(hidden, weight, teacher[:5], forward_kl)
