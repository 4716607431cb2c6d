"""The loss-fused linear cross-entropy kernel (csrc/linear_cross_entropy.cpp) against its float64 reference.

The kernel forms the gradients in the forward (the per-token weights are inputs) and autograd only scales them,
so every test runs a real backward, usually with an upstream gradient != 1, and compares loss and all
gradients with `reference_linear_cross_entropy` evaluated in float64 on the same input values.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import PEAK_EXTRA_BYTES, run_python

import posttrain.ops as ops
from posttrain.ops import build, cross_entropy, fused

REPO_ROOT = Path(__file__).resolve().parents[2]
# (N, H, V, chunk_tokens): "aligned" has N a multiple of the chunk; "odd" (N = 3 * 47) a last chunk of 41 rows.
SHAPES = {"aligned": (512, 128, 2048, 128), "odd": (3 * 47, 123, 1001, 50)}
# The kernel computes in fp32 (bf16 inputs upcast), the reference in float64 on the same input values; bf16
# gradients are rounded to bf16 at the end (and once more when scaled by the upstream gradient): ~2 ulps.
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}
ABSOLUTE_TOLERANCE_PER_SCALE = 2e-5  # times max |expected|: fp32 summation-order noise of the chunked GEMMs


@pytest.fixture(scope="session")
def fused_ops():
    if fused.load_fused_ops() is None:
        pytest.fail(f"fused kernel failed to build: {build.build_failure()}")
    return torch.ops.posttrain


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, input_dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    scale = max(expected.detach().abs().max().item(), 1e-30)
    torch.testing.assert_close(
        actual.detach().double(),
        expected.detach().double(),
        rtol=RELATIVE_TOLERANCE[input_dtype],
        atol=ABSOLUTE_TOLERANCE_PER_SCALE * scale,
        msg=lambda message: f"{what}: {message}",
    )


def make_case(rows: int, hidden_size: int, vocab: int, dtype: torch.dtype, with_bias: bool, seed: int = 0):
    """Random inputs with every fifth row ignored, every seventh weight 0 and the other weights in [0.5, 2)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=generator).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::5] = -100
    token_weights = 0.5 + 1.5 * torch.rand(rows, generator=generator)
    token_weights[::7] = 0.0
    return hidden, weight, bias, targets, token_weights


def loss_and_grads(function, hidden, weight, bias, targets, token_weights, upstream=3.0, **kwargs):
    """loss and the gradients of upstream * loss w.r.t. the inputs that require grad (None for the others)."""
    loss = function(hidden, weight, targets, token_weights, bias, **kwargs)
    inputs = [tensor for tensor in (hidden, weight, bias) if tensor is not None and tensor.requires_grad]
    grads = iter(torch.autograd.grad(loss * upstream, inputs))
    return loss, [next(grads) if t is not None and t.requires_grad else None for t in (hidden, weight, bias)]


def float64_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().double().requires_grad_(tensor.requires_grad)


def reference_float64(hidden, weight, bias, targets, token_weights, upstream=3.0, temperature=1.0):
    return loss_and_grads(
        ops.reference_linear_cross_entropy,
        float64_copy(hidden),
        float64_copy(weight),
        float64_copy(bias),
        targets,
        token_weights.double(),
        upstream,
        temperature=temperature,
    )


def check_against_reference(actual, expected, dtype) -> None:
    (loss, grads), (expected_loss, expected_grads) = actual, expected
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected_loss.detach(), rtol=1e-5, atol=0)
    for name, grad, expected_grad in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, expected_grads):
        assert (grad is None) == (expected_grad is None), name
        if grad is not None:
            assert grad.dtype == dtype, f"{name} must come back in the input dtype"
            assert_close_to(grad, expected_grad, dtype, name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_and_gradients_match_float64_reference(fused_ops, dtype, shape_name, with_bias, temperature):
    rows, hidden_size, vocab, chunk_tokens = SHAPES[shape_name]
    hidden, weight, bias, targets, token_weights = make_case(rows, hidden_size, vocab, dtype, with_bias)
    actual = loss_and_grads(
        cross_entropy.fused_linear_cross_entropy,
        hidden,
        weight,
        bias,
        targets,
        token_weights,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )
    check_against_reference(
        actual, reference_float64(hidden, weight, bias, targets, token_weights, 3.0, temperature), dtype
    )
    dropped = (targets == -100) | (token_weights == 0)
    assert not actual[1][0][dropped].any(), "ignored and zero-weight rows must receive no gradient"


@pytest.mark.parametrize("chunk_tokens", [1, 7, 141, 10_000])
def test_chunk_size_does_not_change_the_result(fused_ops, chunk_tokens):
    """One row per chunk, a chunk that leaves a remainder (141 = 20 * 7 + 1), exactly N, and more than N."""
    hidden, weight, bias, targets, token_weights = make_case(141, 33, 517, torch.float32, with_bias=True, seed=4)
    actual = loss_and_grads(
        cross_entropy.fused_linear_cross_entropy,
        hidden,
        weight,
        bias,
        targets,
        token_weights,
        chunk_tokens=chunk_tokens,
    )
    check_against_reference(actual, reference_float64(hidden, weight, bias, targets, token_weights), torch.float32)


def test_frozen_weight_skips_the_weight_gradient(fused_ops):
    """LoRA / frozen head: no grad_weight is formed (the op returns an empty one: 2 GEMMs), grad_hidden is right."""
    rows, hidden_size, vocab, chunk_tokens = SHAPES["odd"]
    hidden, weight, bias, targets, token_weights = make_case(rows, hidden_size, vocab, torch.float32, True)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    actual = loss_and_grads(
        cross_entropy.fused_linear_cross_entropy,
        hidden,
        weight,
        bias,
        targets,
        token_weights,
        chunk_tokens=chunk_tokens,
    )
    check_against_reference(actual, reference_float64(hidden, weight, bias, targets, token_weights), torch.float32)
    outputs = fused_ops.fused_linear_cross_entropy(
        hidden.detach(), weight, targets, token_weights, bias, 1.0, -100, chunk_tokens, True, False, False
    )
    assert outputs[2].numel() == 0 and outputs[3].numel() == 0 and outputs[1].shape == hidden.shape


def test_no_grad_computes_only_the_loss(fused_ops):
    hidden, weight, bias, targets, token_weights = make_case(141, 123, 1001, torch.float32, True)
    with torch.no_grad():
        loss = cross_entropy.fused_linear_cross_entropy(hidden, weight, targets, token_weights, bias)
    assert not loss.requires_grad
    expected = ops.reference_linear_cross_entropy(
        hidden.double(), weight.double(), targets, token_weights.double(), bias.double()
    )
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=0)


def test_tied_embedding_and_head_gradients_add_up(fused_ops):
    """A tied embedding / lm_head: the op's grad_weight must add to the embedding's own gradient through autograd."""
    generator = torch.Generator().manual_seed(5)
    vocab, hidden_size, rows = 301, 24, 67

    def build(dtype):
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(vocab, hidden_size).to(dtype)
        mixer = torch.nn.Linear(hidden_size, hidden_size).to(dtype)
        return embedding, mixer

    input_ids = torch.randint(0, vocab, (rows,), generator=generator)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::4] = -100
    token_weights = torch.rand(rows, generator=generator)
    results = {}
    for name, dtype, function in (
        ("fused", torch.float32, cross_entropy.fused_linear_cross_entropy),
        ("reference", torch.float64, ops.reference_linear_cross_entropy),
    ):
        embedding, mixer = build(dtype)
        hidden = torch.tanh(mixer(embedding(input_ids)))
        loss = function(hidden, embedding.weight, targets, token_weights.to(dtype))
        (loss * 0.5).backward()
        results[name] = (loss, embedding.weight.grad, mixer.weight.grad)
    for what, actual, expected in zip(("loss", "grad_embedding", "grad_mixer"), results["fused"], results["reference"]):
        assert_close_to(actual, expected, torch.float32, what)
    # The head part alone is not the whole embedding gradient: both paths really contributed.
    embedding, mixer = build(torch.float64)
    hidden = torch.tanh(mixer(embedding(input_ids))).detach()
    head_only = torch.autograd.grad(
        ops.reference_linear_cross_entropy(hidden, embedding.weight, targets, token_weights.double()) * 0.5,
        embedding.weight,
    )[0]
    assert not torch.allclose(head_only, results["reference"][1])


def test_hand_derived_two_token_vocabulary(fused_ops):
    """h = [1], W = [[0], [ln 3]], y = 1, weight 2: logits (0, ln 3), p = (1/4, 3/4).

    loss = -2 ln(3/4) = 0.5753641; dloss/dz = 2 (p - onehot) = (0.5, -0.5), so dW = (0.5, -0.5) h = [[0.5], [-0.5]]
    and dh = 0.5 * 0 - 0.5 * ln 3 = -0.5493061; with temperature 2 (z = (0, ln 3 / 2), p = (1 / (1 + sqrt 3),
    sqrt 3 / (1 + sqrt 3)) = (0.3660254, 0.6339746)): loss = 2 ln(1 + 1/sqrt 3) = 0.9153257.
    """
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)
    targets, token_weights = torch.tensor([1]), torch.tensor([2.0])
    loss = cross_entropy.fused_linear_cross_entropy(hidden, weight, targets, token_weights)
    torch.testing.assert_close(loss, torch.tensor(-2 * math.log(0.75)))
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    torch.testing.assert_close(grad_weight, torch.tensor([[0.5], [-0.5]]))
    torch.testing.assert_close(grad_hidden, torch.tensor([[-0.5 * math.log(3.0)]]))
    hot = cross_entropy.fused_linear_cross_entropy(hidden, weight, targets, token_weights, temperature=2.0)
    torch.testing.assert_close(hot, torch.tensor(2 * math.log(1 + 1 / math.sqrt(3.0))))


def test_all_rows_dropped_give_zero_loss_and_gradients(fused_ops):
    hidden, weight, _, targets, token_weights = make_case(141, 123, 1001, torch.float32, False)
    targets = torch.where(token_weights == 0, targets.clamp(min=0), torch.full_like(targets, -1))
    loss = cross_entropy.fused_linear_cross_entropy(hidden, weight, targets, token_weights, ignore_index=-1)
    assert loss.item() == 0.0
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    assert not grad_hidden.any() and not grad_weight.any()


def test_invalid_inputs_are_rejected_with_the_reason(fused_ops):
    hidden, weight, _, targets, token_weights = make_case(141, 123, 1001, torch.float32, False)
    out_of_range = targets.clone()
    out_of_range[3] = 1001
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 1001\)"):
        cross_entropy.fused_linear_cross_entropy(hidden, weight, out_of_range, token_weights)
    with pytest.raises(RuntimeError, match="token_weights must be \\[N\\]"):
        cross_entropy.fused_linear_cross_entropy(hidden, weight, targets, token_weights[:-1])
    with pytest.raises(RuntimeError, match="chunk_tokens must be >= 1"):
        cross_entropy.fused_linear_cross_entropy(hidden, weight, targets, token_weights, chunk_tokens=0)


def test_default_chunk_keeps_the_tile_bounded():
    for vocab in (1001, 32000, 128256, 10**8):
        for device_type, budget in cross_entropy.CHUNK_BYTES.items():
            chunk = cross_entropy.default_chunk_tokens(vocab, device_type)
            assert chunk >= 1 and (chunk == 1 or chunk * vocab * 4 <= budget)
            assert (chunk + 1) * vocab * 4 > budget, "the chunk should use the budget, not waste it"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_opcheck(fused_ops, dtype, with_bias):
    hidden, weight, bias, targets, token_weights = make_case(141, 123, 1001, dtype, with_bias)
    flags = (True, True, with_bias)
    torch.library.opcheck(
        fused_ops.fused_linear_cross_entropy.default,
        (hidden, weight, targets, token_weights, bias, 0.7, -100, 50, *flags),
    )


def test_linear_cross_entropy_dispatch_and_fallback(fused_ops, monkeypatch):
    hidden, weight, bias, targets, token_weights = make_case(141, 123, 1001, torch.float32, True)
    monkeypatch.delenv(build.DISABLE_ENV_VAR, raising=False)
    calls = []
    original = cross_entropy.fused_linear_cross_entropy
    monkeypatch.setattr(ops, "fused_linear_cross_entropy", lambda *args: calls.append(args) or original(*args))
    fused_loss = ops.linear_cross_entropy(hidden, weight, targets, token_weights, bias)
    plain_loss = ops.linear_cross_entropy(hidden, weight, targets, token_weights, bias, fused=False)
    assert len(calls) == 1, "fused=True must use the kernel, fused=False the reference"
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=0)
    monkeypatch.setenv(build.DISABLE_ENV_VAR, "1")
    ops.linear_cross_entropy(hidden, weight, targets, token_weights, bias)
    assert len(calls) == 1, "POSTTRAIN_DISABLE_FUSED=1 must select the reference"


MEMORY_PROBE = PEAK_EXTRA_BYTES + textwrap.dedent("""
    import json
    import torch
    from posttrain.ops import fused_kernel_available, linear_cross_entropy, reference_linear_cross_entropy

    assert fused_kernel_available()
    rows, hidden_size, vocab = 1024, 64, 32768
    hidden = torch.randn(rows, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / 8).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    token_weights = torch.rand(rows)
    result = {}
    for name, function in (("fused", linear_cross_entropy), ("naive", reference_linear_cross_entropy)):
        kwargs = {"chunk_tokens": 64} if name == "fused" else {}
        def step():
            loss = function(hidden, weight, targets, token_weights, **kwargs)
            torch.autograd.grad(loss, [hidden, weight])
        result[name] = peak_extra_bytes(step)
    print(json.dumps(result))
""")


def test_peak_extra_memory_is_bounded_by_the_chunk(fused_ops):
    """Peak extra RSS of forward+backward at N=1024, V=32768 (logits 128 MiB) with 64-token chunks (8 MiB tiles).

    The naive step must show the [N, V] logits (so the probe can fail); the fused step must stay under twice
    grad_weight (8 MiB: the one formed in the forward, and the copy scaled by the upstream gradient that backward
    returns) plus 1/8 of the logits. Fresh process, MALLOC_MMAP_THRESHOLD_=65536.
    """
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("/proc/self/clear_refs is not writable: cannot reset the peak-RSS counter here")
    result = run_python(MEMORY_PROBE, {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"})
    logits_bytes, grad_weight_bytes = 1024 * 32768 * 4, 32768 * 64 * 4
    assert result["naive"] >= 2 * logits_bytes, result
    assert result["fused"] < 2 * grad_weight_bytes + logits_bytes / 8, result
