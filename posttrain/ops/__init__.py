"""The Python face of csrc/: fused linear log-prob / entropy and cross-entropy ops and their PyTorch references.

`linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, fused=True)`
is what trainers call for per-token log-probs; `linear_cross_entropy(hidden, weight, targets, token_weights, ...)`
for a token-weighted NLL loss whose weights are known before the forward (SFT): it forms the gradients in the
forward, 3 GEMMs instead of 4. For both, `fused=True` uses the compiled kernel when available (falling back
to the reference with one warning otherwise) and `fused=False` always the reference.
`fused_kernel_available(device_type)` says which path `fused=True` takes; setting the environment
variable POSTTRAIN_DISABLE_FUSED=1 forces the reference (no warning: it was asked for).
The compiled kernel is built lazily on the first fused call (about 20-60 s once, then cached).
"""

from __future__ import annotations

import logging
import warnings

import torch

from posttrain.ops.build import DISABLE_ENV_VAR, fused_disabled_by_env
from posttrain.ops.cross_entropy import fused_linear_cross_entropy
from posttrain.ops.fused import fused_linear_logprobs, load_fused_ops
from posttrain.ops.reference import reference_linear_cross_entropy, reference_linear_logprobs

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


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Scalar float32 loss sum_n token_weights[n] * (-log p(targets[n])); see `reference_linear_cross_entropy`.

    fused=True runs the compiled loss-fused kernel (gradients formed in the forward over [chunk_tokens, V] tiles,
    3 GEMMs, no [N, V] logits) when `fused_kernel_available(hidden.device.type)`, else the reference;
    fused=False always the reference. chunk_tokens only affects the kernel (default: a bounded tile, see
    `posttrain.ops.cross_entropy.default_chunk_tokens`).
    """
    if fused and fused_kernel_available(hidden.device.type):
        return fused_linear_cross_entropy(
            hidden, weight, targets, token_weights, bias, temperature, ignore_index, chunk_tokens
        )
    if fused:
        _report_fallback(hidden.device.type)
    return reference_linear_cross_entropy(hidden, weight, targets, token_weights, bias, temperature, ignore_index)


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
        "fused=True falls back to the PyTorch reference for these tensors",
        RuntimeWarning,
        stacklevel=3,
    )


__all__ = [
    "fused_kernel_available",
    "linear_cross_entropy",
    "linear_logprobs",
    "reference_linear_cross_entropy",
    "reference_linear_logprobs",
]
