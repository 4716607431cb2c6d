"""Sampling metrics: the unbiased pass@k estimator and majority vote over extracted answers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from `n` samples of which `c` are correct.

    pass@k = E[1 - C(n - c, k) / C(n, k)] (Chen et al. 2021, "Evaluating Large Language Models Trained
    on Code", the Codex paper): the chance that k samples drawn without replacement from the n hold at
    least one correct one. Computed as the product 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which
    never forms the (huge) binomial coefficients. Exactly 1.0 when n - c < k.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    missing_all = 1.0
    for i in range(n - c + 1, n + 1):
        missing_all *= 1.0 - k / i
    return 1.0 - missing_all


def default_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to `samples`, and `samples` itself."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples] if samples >= 1 else []


def majority_vote(answers: Sequence[Hashable | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None if no sample has an answer.

    `answers[i]` is sample i's extracted answer (None: nothing extractable; it does not vote). The
    winner is the most frequent answer; a tie goes to the tied answer that appears first in sample
    order, and the returned index is its first occurrence, so the result is deterministic for a given
    sample order. The caller scores that sample with the task's verifier.
    """
    votes = Counter(answer for answer in answers if answer is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(i for i, answer in enumerate(answers) if answer is not None and votes[answer] == top)
