"""GSM8K verifier: the last number in the completion must equal the label.

Source: GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"), whose reference
answers end in "#### <number>", and the GSM8K verifier of Tülu 3 RLVR (Lambert et al. 2024).

Rules:
- Thousands separators are stripped first: a comma between a digit and exactly three digits
  ("1,000" -> 1000, "1,234,567" -> 1234567); "1,2,3" is left alone (three numbers).
- A number is optional sign, digits, optional decimals: "-3", "2.50", ".5". The sign counts only
  when it does not follow a word character ("3-4" reads as 3 then 4, "x = -4" as -4); "-" and the
  Unicode minus "−" are both accepted. A sentence's trailing period is not a decimal point.
- The LAST number in the completion is the answer, wherever it sits: "#### 42" works because 42
  is the last number; "42 apples, 3 left" answers 3.
- Answer and label compare exactly as rationals: "2.50" == "2.5", "72.0" == 72.
- The label is an int/float, a numeric string ("1,234"), "#### 72", or a whole GSM8K answer
  (the number after the last "####"; without "####", its last number).
- Numbers longer than 100 characters are not compared (score 0): no label is that long, and
  converting megabytes of digits would cost seconds.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from posttrain.errors import DataError
from posttrain.rewards import register_verifier

MAX_NUMBER_CHARS = 100

_THOUSANDS_SEPARATOR = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_NUMBER = re.compile(r"(?:(?<![\w.])[-−])?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)")


def last_number(text: str) -> Fraction | None:
    """The last number in `text` as an exact Fraction, after stripping thousands separators.

    None if `text` has no number, or if the last one is longer than MAX_NUMBER_CHARS.
    """
    last = None
    for last in _NUMBER.finditer(_THOUSANDS_SEPARATOR.sub("", text)):  # noqa: B007 (the last match is wanted)
        pass
    if last is None or len(last.group()) > MAX_NUMBER_CHARS:
        return None
    return Fraction(last.group().replace("−", "-"))


def label_number(ground_truth: str | int | float) -> Fraction:
    """The label as an exact Fraction; raises DataError naming the label if it holds no number."""
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float, Fraction)):
        raise DataError(f"gsm8k ground_truth must be a number or a string like '72' or '#### 72', got {ground_truth!r}")
    if isinstance(ground_truth, float):
        if not math.isfinite(ground_truth):
            raise DataError(f"gsm8k ground_truth must be finite, got {ground_truth!r}")
        return Fraction(repr(ground_truth))  # repr, not the binary value: 0.1 means 1/10
    if not isinstance(ground_truth, str):
        return Fraction(ground_truth)
    _, _, after_marker = ground_truth.rpartition("####")
    number = last_number(after_marker)
    if number is None:
        raise DataError(f"gsm8k ground_truth {ground_truth[:200]!r} holds no number")
    return number


@register_verifier("gsm8k")
def score_gsm8k(completion: str, ground_truth: str | int | float) -> float:
    """1.0 if the last number in `completion` equals the label, else 0.0 (rules in the module docstring).

    Never raises because of the completion; raises DataError if the label holds no number.
    """
    expected = label_number(ground_truth)
    answer = last_number(completion)
    return 1.0 if answer is not None and answer == expected else 0.0
