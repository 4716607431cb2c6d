"""The kernel half of `posttrain doctor`: the fused log-prob op against its PyTorch reference.

Imports nothing beyond torch and posttrain.ops, so it runs on a GPU box without vLLM, DeepSpeed or Hydra:
`python -c "from posttrain.doctor.kernel import main; main()"` prints the same rows as the doctor.
"""

from __future__ import annotations

import time

import torch

from posttrain.doctor.report import NotRun

# (N, H, V): "aligned" fills whole kernel tiles (256 tokens x 1024 vocabulary, H a multiple of 64); "odd"
# (N = 3 x 47) leaves partial tiles everywhere. The same shapes as tests/ops/test_fused_logprobs.py.
SHAPES = {"aligned": (512, 128, 2048), "odd": (3 * 47, 123, 1001)}
# Both paths accumulate in fp32; gradients are rounded to the input dtype at the end (about two ulps of it).
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}
ABSOLUTE_TOLERANCE_PER_SCALE = 2e-5  # times max |expected|: fp32 summation-order noise of the tiled GEMMs
# Time / memory against the naive path: a realistic RL micro-batch (tokens x vocabulary), hidden 1024.
SPEED_SHAPES = ((8192, 1024, 32000), (8192, 1024, 128256), (32768, 1024, 32000))


def kernel_path(device_type: str) -> str:
    """Which implementation `linear_logprobs(fused=True)` takes for tensors on `device_type`: "fused", or
    "reference (<why>)"."""
    from posttrain.ops import fused_kernel_available
    from posttrain.ops.build import build_failure, fused_disabled_by_env

    if fused_disabled_by_env():
        return "reference (POSTTRAIN_DISABLE_FUSED is set)"
    if fused_kernel_available(device_type):
        return "fused"
    failure = build_failure()
    return f"reference (build failed: {failure})" if failure else f"reference (the build has no {device_type} kernel)"


def make_case(shape, dtype: torch.dtype, device: str, seed: int = 0):
    rows, hidden_size, vocab = shape
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5
    bias = torch.randn(vocab, generator=generator)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::5] = -100  # every fifth row ignored
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden, weight, bias)]
    return (*leaves, targets.to(device))


def outputs_and_grads(function, hidden, weight, bias, targets, temperature: float = 0.7):
    """(logprobs, entropy, d hidden, d weight, d bias) of a fixed random upstream gradient."""
    for leaf in (hidden, weight, bias):
        leaf.grad = None
    logprobs, entropy = function(hidden, weight, targets, bias, temperature)
    generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(logprobs.shape, generator=generator).to(logprobs.device) for _ in range(2)]
    (logprobs * upstream[0] + entropy * upstream[1]).sum().backward()
    return [logprobs.detach(), entropy.detach(), hidden.grad, weight.grad, bias.grad]


def worst_error(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """max |actual - expected| / (atol + rtol |expected|): <= 1 is within tolerance."""
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1e-30)
    allowed = ABSOLUTE_TOLERANCE_PER_SCALE * scale + RELATIVE_TOLERANCE[dtype] * expected.abs()
    return float(((actual - expected).abs() / allowed).max())


def compare_with_reference(device: str) -> str:
    """The fused op's values and every gradient against the reference: fp32 and bf16, aligned and odd shapes.

    Raises AssertionError naming the first case and output out of tolerance."""
    path = kernel_path(device)
    if path != "fused":
        raise AssertionError(f"linear_logprobs would use the {path} on {device}")
    from posttrain.ops.fused import fused_linear_logprobs
    from posttrain.ops.reference import reference_linear_logprobs

    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        for shape_name, shape in SHAPES.items():
            case = make_case(shape, dtype, device)
            fused = outputs_and_grads(fused_linear_logprobs, *case)
            reference = outputs_and_grads(reference_linear_logprobs, *case)
            names = ("logprobs", "entropy", "d_hidden", "d_weight", "d_bias")
            for what, actual, expected in zip(names, fused, reference):
                error = worst_error(actual, expected, dtype)
                if not error <= 1.0:
                    raise AssertionError(
                        f"{what} of {dtype} {shape_name} {shape} is {error:.2f}x the tolerance on {device}"
                    )
                worst = max(worst, error)
    shapes = " and ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in SHAPES.items())
    return f"fp32 + bf16, {shapes}: values and 5 gradients within tolerance (worst {worst:.2f}x of it)"


def check_kernel_cpu(context: dict) -> str:
    """The C++ (CPU) twin of the kernel against the reference."""
    return compare_with_reference("cpu")


def check_kernel_cuda(context: dict) -> str:
    """The CUDA kernel against the reference."""
    return compare_with_reference("cuda")


def timed_peak(function, case, repeats: int = 3) -> tuple[float, int]:
    """(best seconds of forward + backward, peak CUDA memory beyond the inputs in bytes)."""
    outputs_and_grads(function, *case)  # warm-up (and the first call's allocations)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        outputs_and_grads(function, *case)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best, torch.cuda.max_memory_allocated() - baseline


def check_kernel_speed(context: dict) -> str:
    """Fused vs naive (reference) forward + backward in bf16: time and peak extra memory per shape; fails if the
    fused op uses more memory than the naive one (its whole point)."""
    if kernel_path("cuda") != "fused":
        raise NotRun(f"no CUDA kernel: {kernel_path('cuda')}")
    from posttrain.ops.fused import fused_linear_logprobs
    from posttrain.ops.reference import reference_linear_logprobs

    parts = []
    for shape in SPEED_SHAPES:
        case = make_case(shape, torch.bfloat16, "cuda")
        fused_seconds, fused_bytes = timed_peak(fused_linear_logprobs, case)
        try:
            naive_seconds, naive_bytes = timed_peak(reference_linear_logprobs, case)
        except torch.OutOfMemoryError:
            naive_seconds, naive_bytes = float("nan"), None
        del case
        torch.cuda.empty_cache()
        label = f"N{shape[0]} V{shape[2]}"
        if naive_bytes is None:
            parts.append(f"{label}: fused {fused_seconds * 1e3:.1f} ms {fused_bytes / 2**30:.2f} GiB, naive OOM")
            continue
        if fused_bytes > naive_bytes:
            raise AssertionError(f"{label}: fused peak {fused_bytes} B > naive {naive_bytes} B")
        parts.append(
            f"{label}: time {fused_seconds / naive_seconds:.2f}x naive ({fused_seconds * 1e3:.1f} ms), "
            f"memory {fused_bytes / naive_bytes:.3f}x ({fused_bytes / 2**30:.2f} vs {naive_bytes / 2**30:.2f} GiB)"
        )
    return "; ".join(parts)


def main() -> None:
    """The kernel rows alone (no vLLM / DeepSpeed / Hydra needed): `python -m posttrain.doctor.kernel`."""
    from posttrain.doctor.report import Check, render_table, run_checks

    checks = [
        Check("kernel: CPU twin vs reference", check_kernel_cpu),
        Check("kernel: CUDA vs reference", check_kernel_cuda, needs_gpu=True),
        Check("kernel: CUDA time/memory vs naive", check_kernel_speed, needs_gpu=True),
    ]
    results = run_checks(checks, gpus=torch.cuda.device_count())
    print(render_table(results))
    raise SystemExit(1 if any(r.status == "FAIL" for r in results) else 0)


if __name__ == "__main__":
    main()
