"""IFEval verifier: programmatic checks of verifiable instructions; score = fraction satisfied.

Source: IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models",
arXiv:2311.07911) and its reference checkers (google-research `instruction_following_eval`, also
shipped in lm-evaluation-harness); used as an RLVR reward in Tülu 3 (Lambert et al. 2024). This is
the "strict" variant: the response is checked as is, without IFEval's "loose" retries.

Ground truth: a dict, or its JSON string, like an IFEval / open-instruct row:
    {"instruction_id_list": ["length_constraints:number_words", ...],
     "kwargs": [{"num_words": 100, "relation": "at least"}, ...]}
"instruction_id" is accepted for "instruction_id_list"; ids may omit their group ("number_words");
a kwargs entry may be null, and null values inside one are dropped (HuggingFace IFEval rows carry
every key). Unknown ids, missing or unexpected kwargs and bad relations raise DataError.

All 25 IFEval instruction ids are supported: the keys of INSTRUCTION_CHECKS; each check's docstring
states its rule. The other ground-truth format, open-instruct's JSON constraint ({"func_name":
"verify_bullet_points", "N": 3, ...}, Tülu 3's RLVR data), is read by
`posttrain.rewards.ifeval_constraints`. Relations are "less than" (count < N) or "at least" (count >= N).
Deliberate differences from the reference, so that nothing downloads at run time and every check is
linear-time on any text:
- sentences are counted by a rule-based splitter (terminal .!?, skipping common abbreviations and
  initials) instead of nltk's punkt model, which needs a data download;
- change_case:english_capital / english_lowercase check case only; the reference also asks
  langdetect that the text is English, which misreads short all-capital text;
- language:response_language asks langdetect with a fixed seed (the reference's detection is random);
- capital words are \\w+ tokens instead of nltk.word_tokenize tokens;
- keywords, forbidden words and markers match literally (re.escape) instead of as regexes;
- patterns are rewritten without backtracking blow-ups (e.g. bullets use [ \\t]* not \\s*,
  placeholders [^[\\]\\n]* not .*?), which can change counts only in degenerate text;
- invalid JSON nested past Python's recursion limit fails json_format instead of raising.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from typing import Any

from posttrain.errors import DataError
from posttrain.rewards import register_verifier

INSTRUCTION_CHECKS: dict[str, Callable[..., bool]] = {}

RELATIONS = ("less than", "at least")
_WORD = re.compile(r"\w+")
_ABBREVIATIONS = (
    "mr mrs ms dr prof sr jr st vs etc e.g i.e inc ltd co no fig al approx dept est jan feb mar apr "
    "jun jul aug sep sept oct nov dec".split()
)
# A sentence ends at a run of . ! ? (plus closing quotes or brackets) followed by space or the end,
# or at a run of CJK full stops. A period right after an abbreviation ("Dr.") or a capital initial
# ("J.") does not end one. Every lookbehind has a fixed width and matches start only at the head of
# a run, so the pattern stays linear even on a megabyte of "." never followed by a space.
_SENTENCE_END = re.compile(
    r"(?<![.!?])(?:[!?]|\."
    + "".join(rf"(?<!\b{re.escape(abbreviation)}\.)" for abbreviation in _ABBREVIATIONS)
    + r"(?<!\b(?-i:[A-Z])\.))[.!?]*[\"'”’)\]]*(?=\s|$)|[。！？]+",
    re.IGNORECASE,
)
_CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _instruction(instruction_id: str):
    def decorator(check: Callable[..., bool]) -> Callable[..., bool]:
        INSTRUCTION_CHECKS[instruction_id] = check
        return check

    return decorator


def _compare(count: int, threshold: int, relation: str) -> bool:
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise DataError(f"ifeval relation must be one of {RELATIONS}, got {relation!r}")


def count_words(text: str) -> int:
    """Number of \\w+ tokens (the reference's nltk RegexpTokenizer(r"\\w+"))."""
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Number of stretches between sentence ends (see `_SENTENCE_END`) that hold a word character:
    "Dr. Smith arrived. He sat." is 2, "Pi is 3.14 exactly" is 1, "... !!!" is 0.
    """
    return sum(1 for piece in _SENTENCE_END.split(text) if _WORD.search(piece))


# --- keywords ---------------------------------------------------------------------------------


@_instruction("keywords:existence")
def has_keywords(response: str, keywords: list[str]) -> bool:
    """Every keyword occurs, case-insensitively, anywhere (substring match)."""
    lowered = response.lower()
    return all(keyword.lower() in lowered for keyword in keywords)


@_instruction("keywords:frequency")
def has_keyword_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    """Case-insensitive non-overlapping occurrences of `keyword` compare to `frequency` by `relation`."""
    occurrences = len(re.findall(re.escape(keyword), response, flags=re.IGNORECASE))
    return _compare(occurrences, frequency, relation)


@_instruction("keywords:forbidden_words")
def lacks_forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    """No forbidden word occurs as a whole word, case-insensitively."""
    if not forbidden_words:
        return True
    alternatives = "|".join(re.escape(word) for word in forbidden_words)
    return re.search(rf"\b(?:{alternatives})\b", response, flags=re.IGNORECASE) is None


@_instruction("keywords:letter_frequency")
def has_letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    """Case-insensitive count of `letter` compares to `let_frequency` by `let_relation`."""
    return _compare(response.lower().count(letter.lower()), let_frequency, let_relation)


# --- length -----------------------------------------------------------------------------------


@_instruction("length_constraints:number_words")
def has_word_count(response: str, num_words: int, relation: str) -> bool:
    """Word count (\\w+ tokens) compares to `num_words` by `relation`."""
    return _compare(count_words(response), num_words, relation)


@_instruction("length_constraints:number_sentences")
def has_sentence_count(response: str, num_sentences: int, relation: str) -> bool:
    """Sentence count (`count_sentences`) compares to `num_sentences` by `relation`."""
    return _compare(count_sentences(response), num_sentences, relation)


@_instruction("length_constraints:number_paragraphs")
def has_paragraph_count(response: str, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by the markdown divider ***; an empty paragraph
    fails unless it is the first or last (a leading or trailing divider).
    """
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index not in (0, len(paragraphs) - 1):
                return False
            count -= 1
    return count == num_paragraphs


@_instruction("length_constraints:nth_paragraph_first_word")
def has_nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly `num_paragraphs` non-empty paragraphs separated by blank lines ("\\n\\n"), and paragraph
    `nth_paragraph` (1-based) starts with `first_word` (case-insensitive, ignoring quotes and the
    punctuation .,?!'" after it).
    """
    paragraphs = response.split("\n\n")
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    if not 1 <= nth_paragraph <= count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


# --- detectable content and format ------------------------------------------------------------


@_instruction("detectable_content:number_placeholders")
def has_placeholders(response: str, num_placeholders: int) -> bool:
    """At least `num_placeholders` square-bracket placeholders like [address] (within one line)."""
    return len(re.findall(r"\[[^\[\]\n]*\]", response)) >= num_placeholders


@_instruction("detectable_content:postscript")
def has_postscript(response: str, postscript_marker: str) -> bool:
    """The marker occurs, case-insensitively: "P.S." also as "p. s.", "P.P.S" also as "p. p. s"."""
    marker = postscript_marker
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    return re.search(pattern, response.lower()) is not None


@_instruction("detectable_format:number_bullet_lists")
def has_bullet_count(response: str, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullet lines: starting (after spaces) with "* " style or "-"."""
    stars = re.findall(r"^[ \t]*\*[^*\n].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^[ \t]*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


@_instruction("detectable_format:constrained_response")
def is_constrained_response(response: str) -> bool:
    """Contains one of "My answer is yes.", "My answer is no.", "My answer is maybe."."""
    return any(option in response for option in _CONSTRAINED_RESPONSES)


@_instruction("detectable_format:number_highlighted_sections")
def has_highlights(response: str, num_highlights: int) -> bool:
    """At least `num_highlights` non-empty *highlighted* spans; each **bold** span counts once more,
    as in the reference (one line each).
    """
    singles = [span for span in re.findall(r"\*[^\n*]*\*", response) if span.strip("*").strip()]
    doubles = [span for span in re.findall(r"\*\*[^\n*]*\*\*", response) if span[2:-2].strip()]
    return len(singles) + len(doubles) >= num_highlights


@_instruction("detectable_format:multiple_sections")
def has_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` sections, each opened by "<section_spliter> <number>" ("Section 1")."""
    pattern = r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= num_sections


@_instruction("detectable_format:json_format")
def is_json(response: str) -> bool:
    """The whole response parses as JSON, optionally inside a ``` or ```json fence."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if text.startswith(fence):
            text = text[len(fence) :]
            break
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


@_instruction("detectable_format:title")
def has_title(response: str) -> bool:
    """A non-blank title in double angular brackets on one line, like <<poem of joy>>."""
    return any(title.strip() for title in re.findall(r"<<([^<>\n]+)>>", response))


@_instruction("combination:two_responses")
def has_two_responses(response: str) -> bool:
    """Exactly two different non-empty responses separated by six asterisks ******."""
    parts = response.split("******")
    kept = []
    for index, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif index not in (0, len(parts) - 1):
            return False
    return len(kept) == 2 and kept[0] != kept[1]


@_instruction("combination:repeat_prompt")
def repeats_prompt(response: str, prompt_to_repeat: str) -> bool:
    """Starts with the request repeated word for word (case-insensitive, outer whitespace ignored)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@_instruction("startend:end_checker")
def ends_with_phrase(response: str, end_phrase: str) -> bool:
    """Ends with `end_phrase` (case-insensitive; outer whitespace and double quotes ignored)."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@_instruction("startend:quotation")
def is_quoted(response: str) -> bool:
    """The whole response (outer whitespace ignored) is wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@_instruction("language:response_language")
def is_in_language(response: str, language: str) -> bool:
    """langdetect names `language` (an ISO 639-1 code such as "de") as the response's language; text it cannot
    read (no letters) passes, as in the reference."""
    return detect_language(response) in (None, language)


def detect_language(text: str) -> str | None:
    """The ISO 639-1 code langdetect gives `text` (seeded: the same answer every call), None if it finds no
    language features. langdetect reads at most its first 10,000 characters, so any text is fast."""
    import langdetect

    langdetect.DetectorFactory.seed = 0
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


# --- case and punctuation ---------------------------------------------------------------------


@_instruction("change_case:capital_word_frequency")
def has_capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    """Number of all-capital \\w+ words compares to `capital_frequency` by `capital_relation`."""
    capitals = sum(map(str.isupper, _WORD.findall(response)))
    return _compare(capitals, capital_frequency, capital_relation)


@_instruction("change_case:english_capital")
def is_all_capitals(response: str) -> bool:
    """Has cased letters and all are capitals (str.isupper); the language is not checked."""
    return response.isupper()


@_instruction("change_case:english_lowercase")
def is_all_lowercase(response: str) -> bool:
    """Has cased letters and all are lowercase (str.islower); the language is not checked."""
    return response.islower()


@_instruction("punctuation:no_comma")
def has_no_comma(response: str) -> bool:
    """Contains no comma ","."""
    return "," not in response


# --- ground truth and score -------------------------------------------------------------------

_SHORT_IDS = {instruction_id.split(":", 1)[1]: instruction_id for instruction_id in INSTRUCTION_CHECKS}
_INTEGER_KWARGS = frozenset(
    "num_words num_sentences num_paragraphs nth_paragraph num_placeholders num_bullets num_highlights "
    "num_sections frequency let_frequency capital_frequency".split()
)
_LIST_KWARGS = frozenset({"keywords", "forbidden_words"})
_RELATION_KWARGS = frozenset({"relation", "let_relation", "capital_relation"})


def parse_instructions(ground_truth: dict | str) -> list[tuple[str, dict[str, Any]]]:
    """The (instruction id, kwargs) pairs of an IFEval ground truth, validated against the checks.

    Raises DataError naming the problem: not a dict / JSON object, no instruction list, lengths
    differing, an unknown id, or kwargs a check does not take or lacks.
    """
    row = ground_truth
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except ValueError as error:
            raise DataError(f"ifeval ground_truth is not valid JSON ({error}): {ground_truth[:200]!r}") from None
    if not isinstance(row, dict):
        raise DataError(f"ifeval ground_truth must be a dict or a JSON object, got {ground_truth!r:.200}")
    ids = row.get("instruction_id_list", row.get("instruction_id"))
    if not isinstance(ids, list) or not ids:
        raise DataError(
            'ifeval ground_truth needs a non-empty "instruction_id_list", like '
            '{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}; '
            f"got keys {sorted(row)}"
        )
    kwargs_list = row.get("kwargs") or [None] * len(ids)
    if not isinstance(kwargs_list, list) or len(kwargs_list) != len(ids):
        raise DataError(
            f'ifeval "kwargs" must be a list with one entry per instruction ({len(ids)}), got {kwargs_list!r:.200}'
        )
    return [_validated(instruction_id, kwargs) for instruction_id, kwargs in zip(ids, kwargs_list)]


def _coerced(instruction_id: str, key: str, value: Any) -> Any:
    """A kwarg in the type its check expects: ints for counts (JSON may give 3.0 or "3"), lists of
    strings for word lists, a known relation, strings otherwise."""
    where = f"ifeval kwarg {key}={value!r} of {instruction_id}"
    if key in _INTEGER_KWARGS:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = float("nan")
        if isinstance(value, bool) or not number.is_integer():
            raise DataError(f"{where} must be a whole number")
        return int(number)
    if key in _LIST_KWARGS:
        if not isinstance(value, list):
            raise DataError(f"{where} must be a list of strings")
        return [str(item) for item in value]
    if key in _RELATION_KWARGS and value not in RELATIONS:
        raise DataError(f"{where} must be one of {RELATIONS}")
    return str(value)


def _validated(instruction_id: Any, kwargs: Any) -> tuple[str, dict[str, Any]]:
    full_id = _SHORT_IDS.get(instruction_id, instruction_id) if isinstance(instruction_id, str) else None
    if full_id not in INSTRUCTION_CHECKS:
        raise DataError(
            f"unknown ifeval instruction {instruction_id!r}; supported: {', '.join(sorted(INSTRUCTION_CHECKS))}"
        )
    if kwargs is not None and not isinstance(kwargs, dict):
        raise DataError(f"ifeval kwargs for {full_id} must be a dict or null, got {kwargs!r}")
    present = {key: _coerced(full_id, key, value) for key, value in (kwargs or {}).items() if value is not None}
    try:
        inspect.signature(INSTRUCTION_CHECKS[full_id]).bind("response", **present)
    except TypeError as error:
        raise DataError(f"ifeval kwargs {present} do not fit {full_id}: {error}") from None
    return full_id, present


@register_verifier("ifeval")
def score_ifeval(completion: str, ground_truth: dict | str) -> float:
    """Fraction of the ground truth's instructions that `completion` satisfies, in [0, 1]. The ground truth is
    IFEval's (instruction ids + kwargs) or open-instruct's JSON constraint (func_name + kwargs).

    Linear time on any completion; never raises because of the completion; raises DataError for a
    malformed ground truth (see `parse_instructions`).
    """
    from posttrain.rewards.ifeval_constraints import is_constraint_format, score_constraints  # built on the above

    if is_constraint_format(ground_truth):
        return score_constraints(completion, ground_truth)
    instructions = parse_instructions(ground_truth)
    satisfied = [INSTRUCTION_CHECKS[instruction_id](completion, **kwargs) for instruction_id, kwargs in instructions]
    return sum(map(bool, satisfied)) / len(satisfied)
