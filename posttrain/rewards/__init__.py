"""Verifiers registered by name: pure functions (completion text, ground truth) -> score in [0, 1].

A verifier never raises because of the completion text; a malformed ground truth raises DataError.
`posttrain.rewards.reward.score_completion` runs one under a timeout (`posttrain.rewards.safe`) and
turns errors and timeouts into a 0 score with a counted status, so no verifier can crash a run.
"""

from posttrain.registry import Registry

VERIFIERS: Registry = Registry("verifier")
register_verifier = VERIFIERS.register
get_verifier = VERIFIERS.get

# Importing the modules registers their verifiers.
from posttrain.rewards import gsm8k, ifeval, math_answer, short_answer  # noqa: E402,F401
