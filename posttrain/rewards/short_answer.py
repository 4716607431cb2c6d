"""Short-answer verifiers: normalised exact match and token F1, as in the SQuAD evaluation script.

Source: SQuAD (Rajpurkar et al. 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of
Text"), official evaluation script v1.1, and v2.0 for the empty-answer rule of F1.

Normalisation (SQuAD `normalize_answer`): lowercase; drop ASCII punctuation (`string.punctuation`);
drop the articles "a", "an", "the" as whole words; collapse whitespace.
- string_match: 1.0 if the normalised completion equals a normalised acceptable answer.
- f1: harmonic mean of token precision and recall over the normalised whitespace tokens, counting
  repeated tokens as many times as they occur in both; if either side has no tokens, 1.0 when both
  are empty, else 0.0 (SQuAD v2.0).
The ground truth is one string or a list of acceptable strings; the score is the max over them.
Numbers are accepted and compared as their str().
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from posttrain.errors import DataError
from posttrain.rewards import register_verifier

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _acceptable_answers(ground_truth: str | Sequence[str]) -> list[str]:
    answers = [ground_truth] if isinstance(ground_truth, (str, int, float)) else ground_truth
    if isinstance(answers, (bytes, dict)) or not isinstance(answers, Sequence) or not answers:
        raise DataError(
            f"short-answer ground_truth must be a string or a non-empty list of strings, got {ground_truth!r}"
        )
    for answer in answers:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"short-answer ground_truth entries must be strings, got {answer!r}")
    return [str(answer) for answer in answers]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between two strings after `normalize_answer`."""
    prediction_tokens = normalize_answer(prediction).split()
    reference_tokens = normalize_answer(reference).split()
    if not prediction_tokens or not reference_tokens:
        return float(prediction_tokens == reference_tokens)
    shared = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(prediction_tokens)
    recall = shared / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


@register_verifier("string_match")
def score_string_match(completion: str, ground_truth: str | Sequence[str]) -> float:
    """1.0 if the normalised completion equals any normalised acceptable answer, else 0.0.

    Never raises because of the completion; raises DataError for a malformed ground truth.
    """
    normalized = normalize_answer(completion)
    return max(float(normalized == normalize_answer(answer)) for answer in _acceptable_answers(ground_truth))


@register_verifier("f1")
def score_f1(completion: str, ground_truth: str | Sequence[str]) -> float:
    """Max SQuAD token F1 of the completion against the acceptable answers, in [0, 1].

    Never raises because of the completion; raises DataError for a malformed ground truth.
    """
    return max(token_f1(completion, answer) for answer in _acceptable_answers(ground_truth))
