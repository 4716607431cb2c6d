"""`posttrain doctor` (also `make gpu-check`): which of posttrain's GPU paths work on this machine.

Runs a table of checks: the fused kernel against its PyTorch reference (CPU twin; CUDA values, gradients,
fp32 / bf16, odd shapes, and time / memory against the naive path), flash-attn, a vLLM engine (start,
greedy == transformers after a weight sync, sleep / wake freeing memory), NCCL all-reduce across the
visible GPUs, a 20-step ZeRO-3 SFT and a 3-step RLVR on the tiny model across all visible GPUs, and each rank's
host memory while ZeRO-3 loads a ~0.8B model partitioned (under half a float32 copy; a whole copy without). On a
machine without a GPU it runs the CPU half (kernel twin, a tiny SFT, the vLLM CPU engine) and marks the
rest "not run (needs a GPU)". Exit status 1 if any check failed, else 0.

    posttrain doctor                  # everything this machine can run
    posttrain doctor --skip vllm --skip rlvr
    posttrain doctor --kernel-only    # torch only: no vLLM, DeepSpeed or Hydra needed
"""

from __future__ import annotations

import argparse
import sys

from posttrain.doctor import kernel, stack
from posttrain.doctor.report import Check, CheckResult, render_table, run_checks

CHECKS = [
    Check("kernel-cpu", kernel.check_kernel_cpu, description="fused kernel's C++ twin vs the PyTorch reference"),
    Check("kernel-cuda", kernel.check_kernel_cuda, needs_gpu=True, description="CUDA kernel vs reference"),
    Check("kernel-speed", kernel.check_kernel_speed, needs_gpu=True, description="CUDA kernel time/memory vs naive"),
    Check("flash-attn", stack.check_flash_attn, needs_gpu=True, description="flash-attn importable and selected"),
    Check("vllm", stack.check_vllm_start, description="vLLM engine start"),
    Check("vllm-sync", stack.check_vllm_greedy_after_sync, after=("vllm",), description="greedy == HF after a sync"),
    Check("vllm-sleep", stack.check_vllm_sleep, needs_gpu=True, after=("vllm",), description="sleep frees memory"),
    Check("nccl", stack.check_nccl, needs_gpu=True, description="NCCL all-reduce across the visible GPUs"),
    Check("sft", stack.check_sft, description="tiny SFT (ZeRO-3 across GPUs; 1 process on CPU)"),
    Check("sharded-load", stack.check_sharded_load, needs_gpu=True, description="ZeRO-3 load: host RSS < 1/2 copy"),
    Check("rlvr", stack.check_rlvr, needs_gpu=True, description="3-step RLVR across the visible GPUs"),
]
KERNEL_CHECKS = ("kernel-cpu", "kernel-cuda", "kernel-speed")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def print_result(result: CheckResult) -> None:
    print(f"  {result.name}: {result.status} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, checks: list[Check] | None = None, gpus: int | None = None) -> int:
    """Run the checks, print the table; the exit status (1 if any failed). `checks` / `gpus`: for tests."""
    parser = argparse.ArgumentParser(prog="posttrain doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", action="append", default=[], help="a check not to run (repeatable)")
    parser.add_argument("--kernel-only", action="store_true", help="only the kernel checks (torch only)")
    args = parser.parse_args(argv)
    checks = CHECKS if checks is None else checks
    unknown = sorted(set(args.skip) - {check.name for check in checks})
    if unknown:
        parser.error(f"unknown check(s) {unknown}; the checks are {[check.name for check in checks]}")
    if args.kernel_only:
        checks = [check for check in checks if check.name in KERNEL_CHECKS]
    gpus = visible_gpus() if gpus is None else gpus
    print(f"posttrain doctor: {gpus} GPU(s) visible; {len(checks)} checks", file=sys.stderr, flush=True)
    context: dict = {}
    try:
        results = run_checks(checks, gpus, context, skip=args.skip, on_result=print_result)
    finally:
        stack.cleanup(context)
    print(render_table(results))
    return 1 if any(result.status == "FAIL" for result in results) else 0
