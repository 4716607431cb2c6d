"""Verifiable rewards for RLVR: score completions with registered verifiers, safely, and turn scores
into rewards.

Source: Tülu 3 (Lambert et al. 2024, "Tülu 3: Pushing Frontiers in Open Language Model
Post-Training"), RLVR: reward = 10 x verifier score, with an optional penalty when generation did
not stop (open-instruct's `non_stop_penalty`).

Safety contract: a verifier that raises or outlives its deadline scores 0 and is counted, never
crashes the run. Each call returns a status: "ok", "error" (the verifier raised, including
DataError for a malformed ground truth, or returned something that is not a score in [0, 1]) or
"timeout". Configuration mistakes (an unknown verifier name, a row without "verifier") still raise:
they would make every reward meaningless.

DEFAULT_TIMEOUT_S is shorter than the math verifier's own symbolic-check timeout, so a completion
that hangs sympy is cut off here and counted as "timeout" rather than returned as an "ok" 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from posttrain.engine.distributed import all_reduce_sum, rank, world_size
from posttrain.errors import ConfigError, DataError
from posttrain.registry import Registry
from posttrain.rewards import VERIFIERS
from posttrain.rewards.safe import VerificationTimeout, call_with_timeout

logger = logging.getLogger(__name__)

STATUSES = ("ok", "error", "timeout")
DEFAULT_TIMEOUT_S = 3.0


def run_verifier(
    verifier: Callable[[str, Any], float],
    completion: str,
    ground_truth: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[float, str]:
    """`(score, status)` of `verifier(completion, ground_truth)` under a `timeout_s` deadline.

    status is "ok" with the score in [0, 1]; "error" (score 0.0) if the verifier raised an
    Exception or returned a non-number, NaN or a value outside [0, 1]; "timeout" (score 0.0) if it
    did not return within `timeout_s` seconds (see `posttrain.rewards.safe`, any thread).
    """
    name = getattr(verifier, "__name__", repr(verifier))
    try:
        score = call_with_timeout(verifier, (completion, ground_truth), timeout_s)
    except VerificationTimeout:
        logger.debug("verifier %s timed out after %g s", name, timeout_s)
        return 0.0, "timeout"
    except Exception as error:
        logger.warning("verifier %s raised %s: %s", name, type(error).__name__, error)
        return 0.0, "error"
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
        logger.warning("verifier %s returned %r; a score must be a number in [0, 1]", name, score)
        return 0.0, "error"
    return float(score), "ok"


def score_completion(
    verifier_name: str,
    completion: str,
    ground_truth: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    registry: Registry = VERIFIERS,
) -> tuple[float, str]:
    """`(score, status)` of the verifier registered as `verifier_name`; see `run_verifier`.

    Raises ConfigError, listing the known names, if `verifier_name` is not registered.
    """
    return run_verifier(registry.get(verifier_name), completion, ground_truth, timeout_s)


def verifiable_reward(
    score: float,
    finished: bool,
    verification_reward: float = 10.0,
    nonstop_penalty: float = 0.0,
) -> float:
    """reward = verification_reward x score + (nonstop_penalty if not finished else 0).

    `finished` is whether the completion ended with EOS / a stop string rather than hitting the
    length limit. Tülu 3 uses verification_reward = 10; a non-stop penalty such as -10 discourages
    truncated rambling. Here the penalty is added to the verification reward; open-instruct instead
    replaces the whole score of an unfinished completion with it. `nonstop_penalty` must be <= 0.
    """
    if nonstop_penalty > 0:
        raise ConfigError(f"nonstop_penalty must be <= 0 (a penalty), got {nonstop_penalty}; e.g. -10 as in Tülu 3")
    return verification_reward * score + (0.0 if finished else nonstop_penalty)


def score_batch(
    rows: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    finished: Sequence[bool],
    verification_reward: float = 10.0,
    nonstop_penalty: float = 0.0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    registry: Registry = VERIFIERS,
) -> tuple[list[float], dict[str, int]]:
    """Rewards for one rollout batch and how many verifications ended ok / error / timeout.

    rows[i] is the dataset row completions[i] answers: it names its verifier (`"verifier": "gsm8k"`)
    and holds `"ground_truth"`; finished[i] says whether completions[i] stopped by itself. Rewards
    follow `verifiable_reward`; each verification follows `run_verifier` (error and timeout score 0).
    Raises DataError for a row without those fields or mismatched lengths, and ConfigError for an
    unknown verifier name, before any verifier runs.
    """
    if not len(rows) == len(completions) == len(finished):
        raise DataError(
            f"score_batch needs one row and one finished flag per completion; got {len(rows)} rows, "
            f"{len(completions)} completions, {len(finished)} finished flags"
        )
    verifiers = [registry.get(_field(row, "verifier", index)) for index, row in enumerate(rows)]
    ground_truths = [_field(row, "ground_truth", index) for index, row in enumerate(rows)]
    counts = dict.fromkeys(STATUSES, 0)
    rewards = []
    for verifier, completion, ground_truth, stopped in zip(verifiers, completions, ground_truths, finished):
        score, status = run_verifier(verifier, completion, ground_truth, timeout_s)
        counts[status] += 1
        rewards.append(verifiable_reward(score, bool(stopped), verification_reward, nonstop_penalty))
    return rewards, counts


def _field(row: Mapping[str, Any], key: str, index: int) -> Any:
    if not isinstance(row, Mapping) or key not in row:
        raise DataError(
            f'rollout row {index} has no "{key}" field; RLVR rows need "verifier" (e.g. "gsm8k") and '
            f'"ground_truth"; got {row!r:.200}'
        )
    return row[key]


def score_completions(
    prompts: Sequence, completions: Sequence, reward: float, nonstop_penalty: float, timeout_s: float
) -> tuple[list[float], dict[str, int]]:
    """Verifier rewards of rollout completions (completion c answers prompts[c.prompt_index], a PromptRow with
    `verifier` and `ground_truth`) and the counts the RL metrics need: verified, truncated, response tokens,
    verifier errors and timeouts."""
    rows = [{"verifier": prompts[c.prompt_index].verifier, "ground_truth": prompts[c.prompt_index].ground_truth}
            for c in completions]  # fmt: skip
    finished = [c.finish_reason == "stop" for c in completions]
    rewards, counts = score_batch(rows, [c.text for c in completions], finished, reward, nonstop_penalty, timeout_s)
    return rewards, {
        "verified": sum(r >= reward for r in rewards),
        "truncated": sum(not f for f in finished),
        "response_tokens": sum(len(c.token_ids) for c in completions),
        "verifier_errors": counts["error"],
        "verifier_timeouts": counts["timeout"],
    }


def rollout_reward_metrics(rewards, kept_groups: float, counts: dict[str, int], group_size: int) -> dict[str, float]:
    """Step metrics of one rollout batch over all ranks: rewards [P, n] of this rank's groups, how many of its
    groups were kept, and score_completions' counts; every value is all-reduced before dividing."""
    names = ["reward_sum", "reward_sq", "samples", "kept_groups", *counts]
    values = [float(rewards.sum()), float((rewards**2).sum()), float(rewards.numel()), float(kept_groups)]
    totals = dict(zip(names, all_reduce_sum(values + [float(v) for v in counts.values()])))
    samples, mean = max(totals["samples"], 1.0), totals["reward_sum"] / max(totals["samples"], 1.0)
    return {
        "reward_mean": mean,
        "reward_std": max(totals["reward_sq"] / samples - mean**2, 0.0) ** 0.5,
        "accuracy": totals["verified"] / samples,
        "response_length": totals["response_tokens"] / samples,
        "truncated_fraction": totals["truncated"] / samples,
        "groups_kept_fraction": totals["kept_groups"] / (samples / group_size),
        "verifier_errors": totals["verifier_errors"],
        "verifier_timeouts": totals["verifier_timeouts"],
    }


def verified_fraction(rollout, prompts: Sequence, sampling, timeout_s: float) -> float:
    """Fraction of completions (all ranks) of the held-out `prompts` (PromptRows; each rank takes every
    world_size-th from its rank on) under `sampling` that verify, through the rollout service. A collective:
    every rank calls it and generates, also one with no prompts (its rollout group's engine needs every rank)."""
    mine = list(prompts)[rank() :: world_size()]
    completions = rollout.generate([p.prompt for p in mine], sampling)
    rewards, _ = score_completions(mine, completions, 1.0, 0.0, timeout_s)
    correct, samples = float(sum(r >= 1.0 for r in rewards)), float(len(completions))
    total_correct, total = all_reduce_sum([correct, samples])
    return total_correct / max(total, 1.0)
