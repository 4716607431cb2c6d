"""The fused linear log-prob kernel (csrc/fused_logprobs.cpp) against its PyTorch reference.

The first test to need the kernel builds it (JIT, ~20-60 s once; cached afterwards). A build failure
fails these tests rather than skipping them: the fallback is tested on purpose, separately.
"""

from __future__ import annotations

import fcntl
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers import PEAK_EXTRA_BYTES, REPO, run_python

import posttrain.ops as ops
from posttrain.ops import build, fused

REPO_ROOT = Path(__file__).resolve().parents[2]

# (N, H, V): "aligned" fills whole kernel tiles (256 tokens x 1024 vocabulary, H a multiple of 64) and has
# 2 vocabulary tiles; "odd" (N = 3 * 47) leaves partial tiles everywhere and a single vocabulary tile.
SHAPES = {"aligned": (512, 128, 2048), "odd": (3 * 47, 123, 1001)}
# Both paths compute in fp32 (bf16 / fp16 inputs are upcast before the matmul), so outputs agree to fp32
# rounding; gradients are rounded to the input dtype at the end, so they may differ by one ulp of it (at most
# 2^-7 relative for bf16, 2^-10 for fp16): their relative tolerance is about two ulps.
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
ABSOLUTE_TOLERANCE_PER_SCALE = 2e-5  # times max |expected|: fp32 summation-order noise of the tiled GEMMs


@pytest.fixture(scope="session")
def fused_ops():
    """The compiled op, built once per session; a failed build fails the test with the compiler's reason.

    POSTTRAIN_DISABLE_FUSED only steers `linear_logprobs`; these tests call the op directly either way.
    """
    if fused.load_fused_ops() is None:
        pytest.fail(f"fused kernel failed to build: {build.build_failure()}")
    return torch.ops.posttrain


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, input_dtype: torch.dtype, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    scale = max(expected.detach().abs().max().item(), 1e-30)
    torch.testing.assert_close(
        actual,
        expected,
        rtol=RELATIVE_TOLERANCE[input_dtype],
        atol=ABSOLUTE_TOLERANCE_PER_SCALE * scale,
        msg=lambda message: f"{what}: {message}",
    )


def make_case(shape: tuple[int, int, int], dtype: torch.dtype, with_bias: bool, seed: int = 0):
    rows, hidden_size, vocab = shape
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=generator).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::5] = -100  # every fifth row ignored
    return hidden, weight, bias, targets


def outputs_and_grads(function, hidden, weight, bias, targets, temperature, upstream):
    """Forward, then gradients of sum(g_logp * logprobs + g_H * entropy) w.r.t. the differentiable inputs."""
    logprobs, entropy = function(hidden, weight, targets, bias, temperature, -100)
    grad_logprobs, grad_entropy = upstream
    loss = (logprobs * grad_logprobs).sum() + (entropy * grad_entropy).sum()
    inputs = [tensor for tensor in (hidden, weight, bias) if tensor is not None and tensor.requires_grad]
    return (logprobs, entropy), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_outputs_and_gradients_match_reference(fused_ops, dtype, shape_name, with_bias, temperature):
    hidden, weight, bias, targets = make_case(SHAPES[shape_name], dtype, with_bias)
    generator = torch.Generator().manual_seed(1)
    upstream = (torch.randn(len(targets), generator=generator), torch.randn(len(targets), generator=generator))
    expected_outputs, expected_grads = outputs_and_grads(
        ops.reference_linear_logprobs, hidden, weight, bias, targets, temperature, upstream
    )
    actual_outputs, actual_grads = outputs_and_grads(
        fused.fused_linear_logprobs, hidden, weight, bias, targets, temperature, upstream
    )
    for name, actual, expected in zip(("logprobs", "entropy"), actual_outputs, expected_outputs):
        assert_close_to(actual, expected, dtype, name)
    for name, actual, expected in zip(("grad_hidden", "grad_weight", "grad_bias"), actual_grads, expected_grads):
        assert_close_to(actual, expected, dtype, name)
    ignored = targets == -100
    assert torch.all(actual_outputs[0][ignored] == 0) and torch.all(actual_outputs[1][ignored] == 0)
    assert torch.all(actual_grads[0][ignored] == 0), "ignored rows must receive no gradient"


def test_float16_inputs_match_reference(fused_ops):
    hidden, weight, bias, targets = make_case(SHAPES["odd"], torch.float16, with_bias=True)
    upstream = (torch.ones(len(targets)), torch.full((len(targets),), 0.25))
    expected = outputs_and_grads(ops.reference_linear_logprobs, hidden, weight, bias, targets, 0.7, upstream)
    actual = outputs_and_grads(fused.fused_linear_logprobs, hidden, weight, bias, targets, 0.7, upstream)
    names = ("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, actual_tensor, expected_tensor in zip(names, [*actual[0], *actual[1]], [*expected[0], *expected[1]]):
        assert_close_to(actual_tensor, expected_tensor, torch.float16, name)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_backward_parallel_strategies_match_reference(fused_ops, num_threads):
    """V = 1001 is one vocabulary tile: with 2 threads the backward splits the 3 token blocks (560 active rows of
    256) between threads, each with a private grad_weight; with 1 thread it takes the vocabulary-parallel path."""
    hidden, weight, bias, targets = make_case((700, 123, 1001), torch.float32, with_bias=True)
    upstream = (torch.ones(len(targets)), torch.full((len(targets),), -0.5))
    expected = outputs_and_grads(ops.reference_linear_logprobs, hidden, weight, bias, targets, 1.0, upstream)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        actual = outputs_and_grads(fused.fused_linear_logprobs, hidden, weight, bias, targets, 1.0, upstream)
    finally:
        torch.set_num_threads(previous_threads)
    names = ("logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, actual_tensor, expected_tensor in zip(names, [*actual[0], *actual[1]], [*expected[0], *expected[1]]):
        assert_close_to(actual_tensor, expected_tensor, torch.float32, f"{name} with {num_threads} thread(s)")


def test_hand_derived_two_token_vocabulary(fused_ops):
    """h = [1], W = [[0], [ln 3]], y = 1: logits (0, ln 3), p = (1/4, 3/4).

    logprob = ln(3/4) = -0.2876821; entropy = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3 = 0.5623351.
    d logprob / dW = (onehot - p) h = (-1/4, 1/4); d entropy / dz_v = -p_v (z_v - E_p[z]) with
    E_p[z] = (3/4) ln 3 = 0.8239592, so d entropy / dW = (-(1/4)(0 - 0.8239592), -(3/4)(ln 3 - 0.8239592))
    = (0.2059898, -0.2059898).
    """
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)
    targets = torch.tensor([1])
    logprobs, entropy = fused.fused_linear_logprobs(hidden, weight, targets)
    torch.testing.assert_close(logprobs, torch.tensor([math.log(0.75)]))
    torch.testing.assert_close(entropy, torch.tensor([math.log(4.0) - 0.75 * math.log(3.0)]))
    (grad_weight_logprob,) = torch.autograd.grad(logprobs.sum(), weight, retain_graph=True)
    torch.testing.assert_close(grad_weight_logprob, torch.tensor([[-0.25], [0.25]]))
    (grad_weight_entropy,) = torch.autograd.grad(entropy.sum(), weight)
    torch.testing.assert_close(grad_weight_entropy, torch.tensor([[0.2059898], [-0.2059898]]))


def test_large_logits_keep_entropy_accurate(fused_ops):
    """Logits of magnitude ~300: entropy = log Z - D / Z (shifted by the running max) has no cancellation."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 32, generator=generator) * 10
    weight = torch.randn(1500, 32, generator=generator) * 5
    targets = torch.randint(0, 1500, (64,), generator=generator)
    logprobs, entropy = fused.fused_linear_logprobs(hidden, weight, targets)
    log_probs = torch.log_softmax(hidden.double() @ weight.double().t(), dim=-1)  # float64 ground truth
    expected_entropy = -(log_probs.exp() * log_probs).sum(-1)
    expected_logprobs = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=0, atol=1e-4)
    torch.testing.assert_close(logprobs.double(), expected_logprobs, rtol=1e-5, atol=1e-3)


def test_single_output_losses_and_frozen_weight(fused_ops):
    """Only logprobs in the loss (entropy's gradient arrives as None), weight frozen (no grad_weight work)."""
    hidden, weight, _, targets = make_case(SHAPES["odd"], torch.float32, with_bias=False)
    weight = weight.detach()
    (expected,) = torch.autograd.grad(ops.reference_linear_logprobs(hidden, weight, targets)[0].sum(), hidden)
    (actual,) = torch.autograd.grad(fused.fused_linear_logprobs(hidden, weight, targets)[0].sum(), hidden)
    assert_close_to(actual, expected, torch.float32, "grad_hidden, logprobs only")
    (expected,) = torch.autograd.grad(ops.reference_linear_logprobs(hidden, weight, targets)[1].sum(), hidden)
    (actual,) = torch.autograd.grad(fused.fused_linear_logprobs(hidden, weight, targets)[1].sum(), hidden)
    assert_close_to(actual, expected, torch.float32, "grad_hidden, entropy only")


def test_all_rows_ignored_and_custom_ignore_index(fused_ops):
    hidden, weight, _, _ = make_case(SHAPES["odd"], torch.float32, with_bias=False)
    targets = torch.full((hidden.shape[0],), -1)
    logprobs, entropy = fused.fused_linear_logprobs(hidden, weight, targets, ignore_index=-1)
    assert torch.equal(logprobs, torch.zeros_like(logprobs)) and torch.equal(entropy, torch.zeros_like(entropy))
    grad_hidden, grad_weight = torch.autograd.grad((logprobs + entropy).sum(), [hidden, weight])
    assert not grad_hidden.any() and not grad_weight.any()


def test_invalid_targets_are_rejected_with_the_reason(fused_ops):
    hidden, weight, _, targets = make_case(SHAPES["odd"], torch.float32, with_bias=False)
    out_of_range = targets.clone()
    out_of_range[3] = weight.shape[0]
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 1001\)"):
        fused.fused_linear_logprobs(hidden, weight, out_of_range)
    with pytest.raises(RuntimeError, match="targets must be int64"):
        fused.fused_linear_logprobs(hidden, weight, targets.int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_opcheck_forward_and_backward(fused_ops, dtype, with_bias):
    hidden, weight, bias, targets = make_case(SHAPES["odd"], dtype, with_bias)
    torch.library.opcheck(fused_ops.fused_linear_logprobs_forward.default, (hidden, weight, targets, bias, 0.7, -100))
    _, _, lse, mean_logit = fused_ops.fused_linear_logprobs_forward(
        hidden.detach(), weight.detach(), targets, None if bias is None else bias.detach(), 0.7, -100
    )
    upstream = torch.randn(len(targets)), torch.randn(len(targets))
    detached = [tensor.detach() if tensor is not None else None for tensor in (hidden, weight)]
    detached_bias = None if bias is None else bias.detach()
    backward_args = (*upstream, *detached, targets, detached_bias, lse, mean_logit, 0.7, -100)
    for flags in [(True, True, with_bias), (True, False, False)]:
        torch.library.opcheck(fused_ops.fused_linear_logprobs_backward.default, (*backward_args, *flags))


def test_linear_logprobs_dispatches_to_the_kernel(fused_ops, monkeypatch):
    monkeypatch.delenv(build.DISABLE_ENV_VAR, raising=False)
    assert ops.fused_kernel_available("cpu")
    hidden, weight, bias, targets = make_case(SHAPES["odd"], torch.float32, with_bias=True)
    calls = []
    original = fused.fused_linear_logprobs
    monkeypatch.setattr(ops, "fused_linear_logprobs", lambda *args: calls.append(args) or original(*args))
    ops.linear_logprobs(hidden, weight, targets, bias)
    ops.linear_logprobs(hidden, weight, targets, bias, fused=False)
    assert len(calls) == 1, "fused=True must use the kernel, fused=False the reference"


def test_forced_fallback_uses_the_reference_silently(monkeypatch):
    monkeypatch.setenv(build.DISABLE_ENV_VAR, "1")
    assert not ops.fused_kernel_available("cpu")
    hidden, weight, bias, targets = make_case(SHAPES["odd"], torch.float32, with_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user asked for the reference: no warning
        actual = ops.linear_logprobs(hidden, weight, targets, bias, temperature=0.7)
    expected = ops.reference_linear_logprobs(hidden, weight, targets, bias, temperature=0.7)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_build_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    """A source that does not compile: one warning naming the compiler error, then reference results."""
    broken_sources = tmp_path / "csrc"
    broken_sources.mkdir()
    for source in build.CPU_SOURCES:  # every source present, the first one broken
        (broken_sources / source).write_text("// fine\n")
    (broken_sources / build.CPU_SOURCES[0]).write_text('#error "deliberately broken for the fallback test"\n')
    monkeypatch.setattr(build, "SOURCE_DIR", broken_sources)
    monkeypatch.setattr(build, "_extension", None)
    monkeypatch.setattr(build, "_failure", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.delenv(build.DISABLE_ENV_VAR, raising=False)
    hidden, weight, _, targets = make_case(SHAPES["odd"], torch.float32, with_bias=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.linear_logprobs(hidden, weight, targets)
        ops.linear_logprobs(hidden, weight, targets)
        assert not ops.fused_kernel_available("cpu")
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "unavailable" in messages[0] and "deliberately broken" in messages[0]
    expected = ops.reference_linear_logprobs(hidden, weight, targets)
    assert torch.equal(first[0], expected[0]) and torch.equal(first[1], expected[1])


def test_importing_posttrain_does_not_build_or_load_the_kernel():
    state = run_python(
        """
        import json, posttrain, posttrain.ops, torch
        from posttrain.ops import build
        loaded = hasattr(torch.ops.posttrain, "fused_linear_logprobs_forward")
        print(json.dumps({"extension": build._extension is not None, "failure": build._failure, "loaded": loaded}))
        """
    )
    assert state == {"extension": False, "failure": None, "loaded": False}


MEMORY_PROBE = PEAK_EXTRA_BYTES + textwrap.dedent("""
    import json
    import torch
    from posttrain.ops import fused_kernel_available, linear_logprobs, reference_linear_logprobs

    assert fused_kernel_available()
    rows, hidden_size, vocab = 1024, 64, 32768
    hidden = torch.randn(rows, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / 8).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    result = {}
    for name, function in (("fused", linear_logprobs), ("naive", reference_linear_logprobs)):
        def forward():
            function(hidden.detach(), weight.detach(), targets)
        def forward_backward():
            logprobs, entropy = function(hidden, weight, targets)
            torch.autograd.grad((logprobs + entropy).sum(), [hidden, weight])
        result[name] = {"forward": peak_extra_bytes(forward), "step": peak_extra_bytes(forward_backward)}
    print(json.dumps(result))
""")


def test_peak_extra_memory_is_independent_of_the_logits_size(fused_ops):
    """Peak extra RSS of forward and forward+backward, fused vs naive, at N=1024, V=32768 (logits 128 MiB).

    In a fresh process with MALLOC_MMAP_THRESHOLD_=65536 so freed blocks >= 64 KiB leave the RSS at once.
    The naive figures must show the [N, V] logits (that the probe sees them is what makes this test able to
    fail); the fused forward must stay under 1/8 of them, and forward+backward under grad_weight (8 MiB,
    an output) plus 1/8 of them.
    """
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("/proc/self/clear_refs is not writable: cannot reset the peak-RSS counter here")
    result = run_python(MEMORY_PROBE, {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"})
    logits_bytes = 1024 * 32768 * 4
    grad_weight_bytes = 32768 * 64 * 4
    assert result["naive"]["forward"] >= 0.9 * logits_bytes, result
    assert result["naive"]["step"] >= 2 * logits_bytes, result
    assert result["fused"]["forward"] < logits_bytes / 8, result
    assert result["fused"]["step"] < grad_weight_bytes + logits_bytes / 8, result


def test_a_killed_loaders_baton_does_not_block_the_next_load(fused_ops):
    """torch's build baton (`lock` in the build directory) is a plain file: a process SIGKILLed inside
    `cpp_extension.load` leaves it, and every later load waited for it forever (seen: an RLVR rerun after a
    SIGKILL hung). Here a process is killed while it holds posttrain's build lock, with a baton planted as it would
    leave one; a fresh interpreter then loads the real extension within the timeout, and the baton is gone."""
    directory = build.build_directory("posttrain_fused_logprobs")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import pathlib, sys, time
            from posttrain.ops.build import build_lock
            with build_lock(pathlib.Path({str(directory)!r})):
                (pathlib.Path({str(directory)!r}) / "lock").touch()
                print("holding", flush=True)
                time.sleep(600)
        """)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert (directory / "lock").exists()  # the dead holder's baton
        code = "from posttrain.ops import build; print(build.load_fused_extension() is not None)"
        loaded = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert loaded.stdout.strip().splitlines()[-1] == "True", loaded.stderr[-2000:]
        assert not (directory / "lock").exists()
        assert "left by a process killed" in loaded.stderr
    finally:
        holder.kill()
        (directory / "lock").unlink(missing_ok=True)


def test_the_build_lock_is_exclusive_and_removes_a_leftover_baton(tmp_path):
    (tmp_path / "lock").touch()
    with build.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        with open(tmp_path / "posttrain.lock") as handle:  # another holder cannot take it meanwhile
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "posttrain.lock") as handle:  # released on exit
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
