"""IFEval ground truths in open-instruct's JSON constraint format (Tülu 3's RLVR data).

allenai/RLVR-GSM-MATH-IF-Mixed-Constraints (and RLVR-IFeval) hold one constraint per row as a JSON string:
the name of open-instruct's checking function plus every keyword argument of the family, unused ones null:

    {"func_name": "verify_bullet_points", "N": 3, "quantifier": null, "keyword_list": null, ...}

Each of the 25 function names covers one of IFEval's 25 instruction types; CONSTRAINT_CHECKS maps it to a check
of `posttrain.rewards.ifeval`, renaming the arguments, or (where the Tülu 3 instruction text differs from
IFEval's) to a check below that follows the instruction text the prompt carries:
- keyword and letter frequency: "should appear {N} times", exactly N (IFEval: at least / less than);
- word, sentence and capital-word counts: "at least / around / at most {N}"; "around" allows
  max(round(N / 10), 1) words or capital words, 1 sentence;
- paragraph count: paragraphs separated by the divider "* * *" (IFEval: "***"), none empty;
- choice: "Answer with one of the following options: {options}", any option appearing in the response.
Words are whitespace-separated for the word count (as the Tülu 3 checks count them) and \\w+ tokens elsewhere;
the letter count ignores case, as IFEval's does. A ground truth may also be a JSON list of such constraints.

The score is the fraction of constraints satisfied (1 or 0 for a single one). Unknown names, missing or unknown
arguments and bad quantifiers raise DataError: the data is wrong, not the completion.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Callable
from typing import Any

from posttrain.errors import DataError
from posttrain.rewards import ifeval

QUANTIFIERS = ("at least", "around", "at most")
_INTEGER_ARGUMENTS = frozenset({"N", "i"})
_LIST_ARGUMENTS = frozenset({"keyword_list", "forbidden_words"})


def _quantified(count: int, target: int, quantifier: str, around: int) -> bool:
    if quantifier == "at least":
        return count >= target
    if quantifier == "at most":
        return count <= target
    if quantifier == "around":
        return abs(count - target) <= around
    raise DataError(f"ifeval constraint quantifier must be one of {QUANTIFIERS}, got {quantifier!r}")


def _word_tolerance(target: int) -> int:
    return max(round(target * 0.1), 1)


def keyword_appears_exactly(response: str, word: str, N: int) -> bool:
    """`word` occurs exactly N times as a whole \\w+ word, case-insensitively."""
    return sum(token == word.lower() for token in re.findall(r"\w+", response.lower())) == N


def letter_appears_exactly(response: str, letter: str, N: int) -> bool:
    """`letter` occurs exactly N times, case-insensitively."""
    return response.lower().count(letter.lower()) == N


def has_divided_paragraphs(response: str, N: int) -> bool:
    """Exactly N non-empty paragraphs separated by the markdown divider "* * *" (lines' outer spaces ignored)."""
    text = "\n".join(line.strip() for line in response.splitlines()).strip()
    paragraphs = text.split("* * *")
    return all(paragraph.strip() for paragraph in paragraphs) and len(paragraphs) == N


def has_word_count(response: str, N: int, quantifier: str) -> bool:
    """Whitespace-separated words compare to N by `quantifier`; "around" is within max(round(N / 10), 1)."""
    return _quantified(len(response.split()), N, quantifier, _word_tolerance(N))


def has_sentence_count(response: str, N: int, quantifier: str) -> bool:
    """Sentences (`ifeval.count_sentences`) compare to N by `quantifier`; "around" is within 1."""
    return _quantified(ifeval.count_sentences(response), N, quantifier, 1)


def has_capital_word_count(response: str, N: int, quantifier: str) -> bool:
    """All-capital \\w+ words compare to N by `quantifier`; "around" is within max(round(N / 10), 1)."""
    capitals = sum(map(str.isupper, re.findall(r"\w+", response)))
    return _quantified(capitals, N, quantifier, _word_tolerance(N))


def contains_an_option(response: str, options: list[str] | str) -> bool:
    """One of `options` appears in the response. A string of options is read as a Python tuple / list literal
    ("('yes', 'no')", as the Tülu 3 prompts print them), else taken as the one option."""
    if isinstance(options, str):
        try:
            parsed = ast.literal_eval(options)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            parsed = options
        options = [parsed] if isinstance(parsed, str) else list(parsed) if isinstance(parsed, (list, tuple)) else []
    return any(str(option) in response for option in options)


def _renamed(check: Callable[..., bool], **names: str) -> Callable[..., bool]:
    """`check` (an IFEval check) called with open-instruct's argument names: names maps ours -> IFEval's."""

    def call(response: str, **kwargs) -> bool:
        return check(response, **{names[key]: value for key, value in kwargs.items()})

    call.__signature__ = inspect.Signature(
        [inspect.Parameter("response", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in names]
    )
    call.__doc__ = check.__doc__
    return call


CONSTRAINT_CHECKS: dict[str, Callable[..., bool]] = {
    "verify_keywords": _renamed(ifeval.has_keywords, keyword_list="keywords"),
    "verify_keyword_frequency": keyword_appears_exactly,
    "validate_forbidden_words": _renamed(ifeval.lacks_forbidden_words, forbidden_words="forbidden_words"),
    "verify_letter_frequency": letter_appears_exactly,
    "validate_response_language": _renamed(ifeval.is_in_language, language="language"),
    "verify_paragraph_count": has_divided_paragraphs,
    "validate_word_constraint": has_word_count,
    "verify_sentence_constraint": has_sentence_count,
    "validate_paragraphs": _renamed(
        ifeval.has_nth_paragraph_first_word, N="num_paragraphs", i="nth_paragraph", first_word="first_word"
    ),
    "verify_postscript": _renamed(ifeval.has_postscript, postscript_marker="postscript_marker"),
    "validate_placeholders": _renamed(ifeval.has_placeholders, N="num_placeholders"),
    "verify_bullet_points": _renamed(ifeval.has_bullet_count, N="num_bullets"),
    "validate_title": ifeval.has_title,
    "validate_choice": contains_an_option,
    "validate_highlighted_sections": _renamed(ifeval.has_highlights, N="num_highlights"),
    "validate_sections": _renamed(ifeval.has_sections, N="num_sections", section_splitter="section_spliter"),
    "validate_json_format": ifeval.is_json,
    "validate_repeat_prompt": _renamed(ifeval.repeats_prompt, original_prompt="prompt_to_repeat"),
    "validate_two_responses": ifeval.has_two_responses,
    "validate_uppercase": ifeval.is_all_capitals,
    "validate_lowercase": ifeval.is_all_lowercase,
    "validate_frequency_capital_words": has_capital_word_count,
    "validate_end": _renamed(ifeval.ends_with_phrase, end_phrase="end_phrase"),
    "validate_quotation": ifeval.is_quoted,
    "validate_no_commas": ifeval.has_no_comma,
}


def _loaded(ground_truth: Any) -> Any:
    if isinstance(ground_truth, str):
        try:
            return json.loads(ground_truth)
        except ValueError:
            return None
    return ground_truth


def is_constraint_format(ground_truth: Any) -> bool:
    """Whether `ground_truth` (a dict, a list of dicts, or their JSON) is in the func_name format."""
    loaded = _loaded(ground_truth)
    items = loaded if isinstance(loaded, list) else [loaded]
    return bool(items) and all(isinstance(item, dict) and "func_name" in item for item in items)


def _argument(func_name: str, key: str, value: Any) -> Any:
    where = f"ifeval constraint argument {key}={value!r} of {func_name}"
    if key in _INTEGER_ARGUMENTS:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise DataError(f"{where} must be a whole number")
        try:
            number = float(value)
        except ValueError:
            raise DataError(f"{where} must be a whole number") from None
        if not number.is_integer():
            raise DataError(f"{where} must be a whole number")
        return int(number)
    if key in _LIST_ARGUMENTS:
        if not isinstance(value, list):
            raise DataError(f"{where} must be a list of strings")
        return [str(item) for item in value]
    if key == "quantifier" and value not in QUANTIFIERS:
        raise DataError(f"{where} must be one of {QUANTIFIERS}")
    return value if key == "options" and isinstance(value, list) else str(value)


def parse_constraint(constraint: dict) -> tuple[str, dict[str, Any]]:
    """(func_name, arguments) of one constraint: null arguments dropped, the rest typed and checked against the
    function's parameters. DataError for an unknown name or arguments it does not take or lacks."""
    func_name = constraint.get("func_name")
    if func_name not in CONSTRAINT_CHECKS:
        raise DataError(
            f"unknown ifeval constraint func_name {func_name!r}; supported: {', '.join(sorted(CONSTRAINT_CHECKS))}"
        )
    arguments = {
        key: _argument(func_name, key, value)
        for key, value in constraint.items()
        if key != "func_name" and value is not None
    }
    try:
        inspect.signature(CONSTRAINT_CHECKS[func_name]).bind("response", **arguments)
    except TypeError as error:
        raise DataError(f"ifeval constraint arguments {arguments} do not fit {func_name}: {error}") from None
    return func_name, arguments


def score_constraints(completion: str, ground_truth: Any) -> float:
    """Fraction of the constraints in `ground_truth` (one func_name dict, a list of them, or their JSON) that
    `completion` satisfies."""
    loaded = _loaded(ground_truth)
    constraints = [parse_constraint(item) for item in (loaded if isinstance(loaded, list) else [loaded])]
    satisfied = [CONSTRAINT_CHECKS[name](completion, **arguments) for name, arguments in constraints]
    return sum(map(bool, satisfied)) / len(satisfied)
