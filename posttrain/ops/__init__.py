"""The Python face of csrc/: fused linear log-prob / entropy ops and their PyTorch reference.

`linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, fused=True)`
is what trainers call. With `fused=True` it uses the compiled kernel when available (falling back to
the reference with one warning otherwise); with `fused=False` it always uses the reference.
`fused_kernel_available(device_type)` says which path `fused=True` takes; setting the environment
variable POSTTRAIN_DISABLE_FUSED=1 forces the reference (no warning: it was asked for).
The compiled kernel is built lazily on the first fused call (about 20-60 s once, then cached).
"""

from __future__ import annotations

import logging
import warnings

import torch

from posttrain.ops.build import DISABLE_ENV_VAR, fused_disabled_by_env
from posttrain.ops.fused import fused_linear_logprobs, load_fused_ops
from posttrain.ops.reference import reference_linear_logprobs

logger = logging.getLogger(__name__)

_fallback_reported: set[str] = set()  # device types (or "disabled") already reported once


def fused_kernel_available(device_type: str = "cpu") -> bool:
    """Whether `linear_logprobs(..., fused=True)` runs the compiled kernel for tensors on `device_type`.

    False when POSTTRAIN_DISABLE_FUSED is set, when the extension failed to build (warned once), or
    when the build has no kernel for that device type (e.g. "cuda" in a CPU-only build). The first call
    triggers the build.
    """
    if fused_disabled_by_env():
        return False
    extension = load_fused_ops()
    return extension is not None and device_type in extension.device_types


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logprobs [N], entropy [N]) in float32; see `reference_linear_logprobs` for the contract.

    fused=True runs the compiled kernel (O(N) extra memory, no [N, V] logits) when
    `fused_kernel_available(hidden.device.type)`, else the reference; fused=False always the reference.
    """
    if fused and fused_kernel_available(hidden.device.type):
        return fused_linear_logprobs(hidden, weight, targets, bias, temperature, ignore_index)
    if fused:
        _report_fallback(hidden.device.type)
    return reference_linear_logprobs(hidden, weight, targets, bias, temperature, ignore_index)


def _report_fallback(device_type: str) -> None:
    """One message per reason: info if the user disabled the kernel, a warning if it lacks this device."""
    if fused_disabled_by_env():
        if "disabled" not in _fallback_reported:
            _fallback_reported.add("disabled")
            logger.info("%s is set: linear_logprobs uses the PyTorch reference", DISABLE_ENV_VAR)
        return
    extension = load_fused_ops()
    if extension is None or device_type in _fallback_reported:
        return  # a failed build was already warned about by posttrain.ops.build
    _fallback_reported.add(device_type)
    warnings.warn(
        f"the fused log-prob extension has no {device_type!r} kernel (built for {sorted(extension.device_types)}); "
        "linear_logprobs(fused=True) falls back to the PyTorch reference for these tensors",
        RuntimeWarning,
        stacklevel=3,
    )


__all__ = ["fused_kernel_available", "linear_logprobs", "reference_linear_logprobs"]
