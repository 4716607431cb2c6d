"""Verifiers registered by name: pure functions (completion text, ground truth) -> score in [0, 1].

A verifier never raises on any input; see `posttrain.rewards.safe` for the timeout and error wrapper.
"""

from posttrain.registry import Registry

VERIFIERS: Registry = Registry("verifier")
register_verifier = VERIFIERS.register
get_verifier = VERIFIERS.get
