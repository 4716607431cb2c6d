"""MATH verifier: extract the final answer, then check symbolic equivalence with math_verify.

Sources: the MATH dataset (Hendrycks et al. 2021, "Measuring Mathematical Problem Solving With the
MATH Dataset"), whose solutions put the answer in \\boxed{...} (their `last_boxed_only_string`);
Minerva (Lewkowycz et al. 2022), whose prompt ends answers with "Final Answer: The final answer is
X. I hope it is correct."; the Tülu 3 RLVR MATH verifier (Lambert et al. 2024); and HuggingFace's
math_verify package for the equivalence test.

Answer extraction, first rule that applies:
1. The last \\boxed or \\fbox: its brace-matched argument (nested braces fine; \\{ and \\} are
   literal braces, not groups), or after a space the text up to the next "$" or line end
   ("\\boxed 5"). A last box that never closes ("\\boxed{\\frac{") gives no answer.
2. The last "The final answer is X" (any case): the rest of that line, cut before "I hope it is
   correct", without a trailing period or surrounding "$".
3. The content of the last $...$ pair.
Answers longer than MAX_ANSWER_CHARS give no answer (real MATH answers are under 100 characters).

Equivalence, cheapest test first:
1. Fast path, in this process: answers equal after dropping spaces, "$", "\\left"/"\\right", thin spaces
   and a trailing period are equivalent; two plain numbers ("-3", "2.50", "7/2", "\\frac{7}{2}") are
   equivalent when equal as exact fractions, and two different plain integers are not.
2. Otherwise both answers are parsed as LaTeX with `math_verify.parse` and compared with
   `math_verify.verify(gold, predicted)` ("\\frac{1}{2}" == "0.5" == "1/2", "x=5" matches "5", sets
   ignore order, ...) in a killable worker process (`posttrain.rewards.symbolic`), with math_verify's
   own SIGALRM timeouts off. LaTeX that sends the ANTLR parser or sympy into minutes of work
   ("\\boxed{10^{10^{10}}}": one big-integer power that no signal or thread can interrupt) scores 0
   after `timeout_s`, from any thread, and its worker is killed and replaced.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction

from posttrain.errors import DataError
from posttrain.rewards import register_verifier
from posttrain.rewards.safe import VerificationTimeout
from posttrain.rewards.symbolic import SymbolicWorkerError, shared_pool

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000
DEFAULT_TIMEOUT_S = 5.0  # as math_verify's own default; reward.DEFAULT_TIMEOUT_S is shorter on purpose

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
_FINAL_ANSWER = re.compile(r"final answer is", re.IGNORECASE)
_DOLLAR_MATH = re.compile(r"\$([^$]+)\$")
# Fast path: what never changes an answer's value (whitespace only where no letters meet: "\\sin x" is not
# "\\sinx"), and the plain numbers compared without sympy: a decimal, a/b, or \\frac{a}{b}.
_IGNORED = re.compile(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])|\$|\\left|\\right|\\[,;!]")
_PLAIN_NUMBER = re.compile(
    r"(?P<sign>-?)(?:(?P<decimal>\d{1,100}(?:\.\d{1,100})?|\.\d{1,100})|(?P<a>\d{1,100})/(?P<b>\d{1,100})"
    r"|\\[dt]?frac\{(?P<c>\d{1,100})\}\{(?P<d>\d{1,100})\})"
)


def _braced_argument(text: str, open_index: int) -> str | None:
    """Content of the group opened by the "{" at `open_index`, or None if it never closes."""
    depth = 0
    for token in _BRACE_OR_ESCAPE.finditer(text, open_index):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : token.start()]
    return None


def last_boxed(text: str) -> str | None:
    """Argument of the last \\boxed / \\fbox in `text` (rule 1), or None if absent or unclosed."""
    start, command = max((text.rfind(command), command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    after = start + len(command)
    rest = text[after:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return _braced_argument(text, after + len(rest) - len(stripped))
    if rest[:1].isspace():  # "\boxed 5$" (Hendrycks et al.): up to the next "$" or line end
        return re.split(r"[$\n]", stripped, maxsplit=1)[0].strip()
    return None  # "\boxedfoo" is another command, not a box


def _minerva_final_answer(text: str) -> str | None:
    last = None
    for last in _FINAL_ANSWER.finditer(text):  # noqa: B007 (the last match is wanted)
        pass
    if last is None:
        return None
    line = text[last.end() :].split("\n", 1)[0]
    answer = re.split(r"i hope it is correct", line, maxsplit=1, flags=re.IGNORECASE)[0]
    return answer.strip().rstrip(".").strip().strip("$").strip()


def _last_dollar_math(text: str) -> str | None:
    last = None
    for last in _DOLLAR_MATH.finditer(text):  # noqa: B007 (the last match is wanted)
        pass
    return None if last is None else last.group(1).strip()


def extract_answer(text: str) -> str | None:
    """The final answer in a completion by the rules of the module docstring, or None if there is none."""
    if any(command in text for command in _BOX_COMMANDS):
        answer = last_boxed(text)
    else:
        answer = _minerva_final_answer(text)
        if answer is None:
            answer = _last_dollar_math(text)
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def gold_answer(ground_truth: str | int | float) -> str:
    """The reference answer: a bare answer ("\\frac{1}{2}", 3) or a MATH solution with \\boxed{...}.

    Raises DataError naming the ground truth if it holds no answer.
    """
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        raise DataError(f"math ground_truth must be a string or a number, got {ground_truth!r}")
    text = str(ground_truth)
    answer = last_boxed(text) if any(command in text for command in _BOX_COMMANDS) else text
    answer = (answer or "").strip().strip("$").strip()
    if not answer:
        raise DataError(f"math ground_truth {text[:200]!r} holds no answer (empty or an unclosed \\boxed)")
    return answer


def _normalized(answer: str) -> str:
    return _IGNORED.sub("", answer).rstrip(".")


def _plain_number(answer: str) -> Fraction | None:
    match = _PLAIN_NUMBER.fullmatch(answer)
    if match is None:
        return None
    numerator, denominator = match["a"] or match["c"], match["b"] or match["d"]
    if numerator is None:
        value = Fraction(match["decimal"])
    elif int(denominator) == 0:
        return None
    else:
        value = Fraction(int(numerator), int(denominator))
    return -value if match["sign"] else value


def quick_equivalent(gold: str, predicted: str) -> bool | None:
    """The fast path (rule 1 of the module docstring): True or False when string and number comparisons decide,
    None when only the symbolic check can."""
    gold, predicted = _normalized(gold), _normalized(predicted)
    if gold == predicted:
        return True
    gold_number, predicted_number = _plain_number(gold), _plain_number(predicted)
    if gold_number is None or predicted_number is None:
        return None
    if gold_number == predicted_number:
        return True
    if gold_number.denominator == predicted_number.denominator == 1 and "." not in gold + predicted:
        return False  # distinct integers; decimals go on to math_verify, which rounds them
    return None


def answers_equivalent(gold: str, predicted: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two extracted answers are mathematically equal: the fast path, else math_verify (gold first:
    verify is asymmetric) in a worker process. False if the symbolic check takes longer than `timeout_s`
    seconds, or fails.
    """
    quick = quick_equivalent(gold, predicted)
    if quick is not None:
        return quick
    try:
        return shared_pool().equivalent(gold, predicted, timeout_s)
    except VerificationTimeout:
        logger.debug("math equivalence timed out after %g s for answer %.80r", timeout_s, predicted)
        return False
    except SymbolicWorkerError:
        logger.warning("math equivalence failed for answer %.80r", predicted, exc_info=True)
        return False


@register_verifier("math")
def score_math(completion: str, ground_truth: str | int | float, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the completion's final answer is equivalent to the ground truth, else 0.0.

    Rules in the module docstring. Bounded time on any completion (`timeout_s` for the symbolic
    check, linear-time extraction before it); never raises because of the completion; raises
    DataError if the ground truth holds no answer.
    """
    gold = gold_answer(ground_truth)
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    return 1.0 if answers_equivalent(gold, predicted, timeout_s) else 0.0
