"""Answer extraction per verifier, for majority voting: completion text -> a canonical answer or None.

Two completions vote together when their extracted answers are equal, so each extractor canonicalises
with its verifier's own parsing (the verifier, not this key, still decides whether the winner is
right). Verifiers without a single final answer (ifeval: instructions, not answers) have no extractor,
and their tasks report no majority vote.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.registry import Registry

ANSWER_EXTRACTORS: Registry = Registry("answer extractor")
register_answer_extractor = ANSWER_EXTRACTORS.register


@register_answer_extractor("gsm8k")
def gsm8k_answer(completion: str) -> str | None:
    """The last number as an exact fraction ("2.50" and "2.5" both give "5/2"), as the gsm8k verifier reads it."""
    from posttrain.rewards.gsm8k import last_number

    number = last_number(completion)
    return None if number is None else str(number)


@register_answer_extractor("math")
def math_answer(completion: str) -> str | None:
    """The math verifier's extracted final answer with whitespace removed ("\\frac{1}{2}" and "0.5" stay distinct)."""
    from posttrain.rewards.math_answer import extract_answer

    answer = extract_answer(completion)
    return None if answer is None else "".join(answer.split())


@register_answer_extractor("string_match")
def string_match_answer(completion: str) -> str | None:
    """The SQuAD-normalised completion (lowercase, no punctuation or articles)."""
    from posttrain.rewards.short_answer import normalize_answer

    return normalize_answer(completion) or None


register_answer_extractor("f1")(string_match_answer)


def answer_extractor(verifier: str) -> Callable[[str], str | None] | None:
    """The extractor registered for `verifier`, or None if majority voting does not apply to it."""
    return ANSWER_EXTRACTORS.get(verifier) if verifier in ANSWER_EXTRACTORS else None
